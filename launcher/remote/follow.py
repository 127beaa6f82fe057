"""follow.py STATE_DIR ROLE... : print the new complete log lines of each role since the
last call (offsets kept in STATE_DIR), then each role's state, as JSON lines, and __FINISHED__ once every role has exited. The launcher
calls it every second through Ansible and streams what it prints."""
import json
import os
import sys

state, roles = sys.argv[1], sys.argv[2:]
finished = True
for role in roles:
    log, offset_file = os.path.join(state, role + ".log"), os.path.join(state, role + ".offset")
    try:
        offset = int(open(offset_file).read())
    except (OSError, ValueError):
        offset = 0
    try:
        with open(log, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read(1 << 20)
    except OSError:
        chunk = b""
    rc_file = os.path.join(state, role + ".rc")
    exited = os.path.exists(rc_file)
    end = len(chunk) if exited else chunk.rfind(b"\n") + 1  # whole lines, unless the role is done
    if end:
        with open(offset_file, "w") as handle:
            handle.write(str(offset + end))
        for line in chunk[:end].decode("utf-8", "replace").splitlines():
            print(json.dumps({"role": role, "line": line}))
    rc = None
    if exited:
        try:
            rc = int(open(rc_file).read().strip() or 1)
        except (OSError, ValueError):
            rc = 1
    more = len(chunk) == (1 << 20)  # a backlog larger than one read: keep following
    print(json.dumps({"role": role, "exited": exited, "rc": rc}))
    finished = finished and exited and not more
if finished:
    print("__FINISHED__")
