"""follow.py STATE_DIR ROLE... : print the new complete log lines of each role since the
last call (offsets kept in STATE_DIR), then each role's state (exited, exit code, restarts
by supervise.sh), as JSON lines, and __FINISHED__ once every role has exited. The launcher
calls it every second through Ansible and streams what it prints."""
import json
import os
import sys

CHUNK = 1 << 20


def group_alive(state, role):
    try:
        pid = int(open(os.path.join(state, role + ".pid")).read().strip())
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except (OSError, ValueError):
        return True  # no permission or no PID yet: assume it runs


def exit_code(rc_file):
    try:
        return int(open(rc_file).read().strip())
    except (OSError, ValueError):
        return None


def restarts(state, role):
    """How often supervise.sh restarted the role (0: never, or not supervised)."""
    return exit_code(os.path.join(state, role + ".restarts")) or 0


state, roles = sys.argv[1], sys.argv[2:]
finished = True
for role in roles:
    log, offset_file = os.path.join(state, role + ".log"), os.path.join(state, role + ".offset")
    rc_file = os.path.join(state, role + ".rc")
    # Look at the exit status *before* reading: whatever the role printed before exiting is then in the file.
    rc = exit_code(rc_file)
    if rc is None and not group_alive(state, role):
        rc = exit_code(rc_file)  # it may have finished between the two looks
        if rc is None:
            rc = -1  # killed without writing a status (e.g. stopped from elsewhere, host rebooted)
    exited = rc is not None
    try:
        offset = int(open(offset_file).read())
    except (OSError, ValueError):
        offset = 0
    try:
        with open(log, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read(CHUNK)
    except OSError:
        chunk = b""
    end = len(chunk) if exited else chunk.rfind(b"\n") + 1  # whole lines, unless the role is done
    if end:
        with open(offset_file, "w") as handle:
            handle.write(str(offset + end))
        for line in chunk[:end].decode("utf-8", "replace").splitlines():
            print(json.dumps({"role": role, "line": line}))
    more = len(chunk) == CHUNK  # a backlog larger than one read: keep following
    print(json.dumps({"role": role, "exited": exited, "rc": rc, "restarts": restarts(state, role)}))
    finished = finished and exited and not more
if finished:
    print("__FINISHED__")
