#!/bin/sh
# stop-roles.sh STATE_DIR ROLE... : SIGTERM each role's process group, SIGKILL what is left
# after 10 s, and report what was stopped. Roles that already exited are skipped.
state=$1
shift
for role in "$@"; do
  pidfile="$state/$role.pid"
  [ -f "$pidfile" ] || continue
  [ -f "$state/$role.rc" ] && continue  # already exited: its PID may belong to someone else now
  pid=$(cat "$pidfile")
  case "$pid" in ''|*[!0-9]*) continue ;; esac
  if kill -0 "-$pid" 2>/dev/null; then
    kill -TERM "-$pid" 2>/dev/null || true
    i=0
    while kill -0 "-$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    kill -KILL "-$pid" 2>/dev/null || true
    echo "stopped $role (process group $pid)"
  fi
done
