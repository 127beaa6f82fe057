#!/bin/sh
# rank.sh STATE_DIR CMD [ARG...] : what horovodrun starts for each rank, on every host.
# Only the horovodrun role on the first host has a PID file from run-role.sh; ranks on the
# other hosts are children of sshd there, and stopping horovodrun does not reach them. So
# each rank starts CMD in its own session (PID = process-group id) and records it, atomically,
# in STATE_DIR/rank-<host>-<rank>.pid for stop-roles.sh on that host. UNET_STATE=STATE_DIR
# marks the processes as this run's (PID-reuse guard). exec keeps stdout/stderr and the exit
# status horovodrun expects; setsid -w only forks (and waits) if we already lead a group.
set -eu
state=$1
shift
rank=${HOROVOD_RANK:-${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-unknown}}}
UNET_STATE=$state
export UNET_STATE
mkdir -p "$state"
exec setsid -w sh -c 'echo $$ > "$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' \
  "$state/rank-$(uname -n)-$rank.pid" "$@"
