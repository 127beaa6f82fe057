#!/bin/sh
# supervise.sh MAX_RESTARTS PREFIX LABEL CMD [ARG...] : run a PS-mode worker, and run the same
# argv again (same host, same port) when the process dies, at most MAX_RESTARTS times.
#
# "Dies" means: exits non-zero without having declared itself finished. A role declares itself
# finished by creating $UNET_ROLE_FINISHED_FILE (trainer/runtime/ps/roles.py) when the chief told
# it to stop (with whatever exit code the chief asked for), when the chief went away, or when its
# own input is wrong: a restart cannot help in any of those cases. A SIGKILL, a crash or the OOM
# killer leaves no such file, so the worker is started again and registers with the chief again.
#
# PREFIX.restarts holds the restart count (written atomically); each restart also prints one line
# here, which run-role.sh sends to the role's log that follow.py streams. This script runs inside
# the role's process group (run-role.sh), so stop-roles.sh's SIGTERM ends it together with the
# worker, and a stopped supervisor restarts nothing. User values are positional arguments only.
set -u
max=$1 prefix=$2 label=$3
shift 3
finished="$prefix.finished"
rm -f "$finished" "$prefix.restarts"
UNET_ROLE_FINISHED_FILE=$finished
export UNET_ROLE_FINISHED_FILE
restarts=0
while :; do
  "$@"
  rc=$?
  if [ "$rc" -eq 0 ] || [ -e "$finished" ]; then
    exit "$rc"
  fi
  if [ "$restarts" -ge "$max" ]; then
    echo "$(date '+%Y-%m-%d %H:%M:%S') supervise: $label died (exit $rc); not restarted: cluster.max_restarts ($max) reached"
    exit "$rc"
  fi
  restarts=$((restarts + 1))
  echo "$restarts" > "$prefix.restarts.tmp" && mv "$prefix.restarts.tmp" "$prefix.restarts"
  echo "$(date '+%Y-%m-%d %H:%M:%S') supervise: $label restarted ($restarts/$max) after it died (exit $rc)"
  sleep 1  # a worker that dies at once does not spin
done
