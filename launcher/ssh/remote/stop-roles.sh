#!/bin/sh
# stop-roles.sh STATE_DIR ROLE... : stop this run's process groups on this host, each role's
# (STATE_DIR/<role>.pid) and each Horovod rank's started here (STATE_DIR/rank-<host>-*.pid;
# the folder may be shared with other hosts over NFS). A group is signalled only while one of
# its processes carries UNET_STATE=STATE_DIR in its environment, so a PID reused by someone
# else is never hit. SIGTERM every group, then SIGKILL only those still alive after 10 s.
state=$1
shift
marker="UNET_STATE=$state"

ours() {  # ours PGID: a live process of group PGID was started by this run
  for p in $1 $(pgrep -g "$1" 2>/dev/null); do
    tr '\0' '\n' 2>/dev/null < "/proc/$p/environ" | grep -Fqx -e "$marker" && return 0
  done
  return 1
}

stopping=""
term() {  # term LABEL PIDFILE
  [ -f "$2" ] || return 0
  pid=$(cat "$2" 2>/dev/null) || return 0
  case "$pid" in ''|*[!0-9]*) return 0 ;; esac
  ours "$pid" || return 0
  kill -TERM "-$pid" 2>/dev/null || return 0
  stopping="$stopping $pid"
  echo "stopped $1 (process group $pid)"
}

for role in "$@"; do
  term "$role" "$state/$role.pid"
done
for pidfile in "$state/rank-$(uname -n)-"*.pid; do
  rank=${pidfile##*-}
  term "rank ${rank%.pid}" "$pidfile"
done

i=0
while [ $i -lt 100 ]; do
  alive=""
  for pid in $stopping; do
    ours "$pid" && alive="$alive $pid"  # zombies (empty environ) do not count
  done
  [ -z "$alive" ] && exit 0
  sleep 0.1
  i=$((i + 1))
done
for pid in $alive; do
  ours "$pid" && kill -KILL "-$pid" 2>/dev/null && echo "killed process group $pid (still running 10 s after SIGTERM)"
done
exit 0
