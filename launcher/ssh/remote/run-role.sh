#!/bin/sh
# run-role.sh LOG RCFILE PIDFILE CMD [ARG...]
# Start CMD in a new session (its PID is also its process-group id, so the launcher can
# stop it and everything it spawned with one signal), output to LOG, exit code to RCFILE.
# UNET_STATE=<the PID file's folder> marks the session's processes as this run's, so
# stop-roles.sh never signals a PID that was since reused by someone else.
# User-controlled values arrive only as positional arguments: nothing is re-parsed by a shell.
set -eu
log=$1 rc=$2 pidfile=$3
shift 3
mkdir -p "$(dirname "$log")" "$(dirname "$pidfile")"
rm -f "$rc" "${log%.log}.offset"
UNET_STATE=$(dirname "$pidfile")
export UNET_STATE
# the exit code is written atomically (temp file + mv), so a reader never sees it half-written
setsid sh -c '"$@"; echo $? > "$0.tmp"; mv "$0.tmp" "$0"' "$rc" "$@" > "$log" 2>&1 < /dev/null &
# the PID file too: follow.py and stop-roles.sh never read a half-written PID
echo $! > "$pidfile.tmp"
mv "$pidfile.tmp" "$pidfile"
echo "$!"
