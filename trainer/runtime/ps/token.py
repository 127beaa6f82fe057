"""The control channel's shared secret: a random token in a file only its owner may read.

``unet-train distributed`` writes a fresh token per run and syncs it (mode 0600) to every host;
``unet-train manifests --target kubeflow`` puts a fresh one per run in a Kubernetes Secret,
mounted read-only (defaultMode 0400) where ``cluster.token_file`` points.
Roles started by hand share ``cluster.token_file``: whichever role starts first creates it,
atomically (a complete file appears under the name, or nothing), and the others read it; on
several hosts, copy it (``scp -p``) or keep it on a shared home.
"""
from __future__ import annotations

import os
import re
import secrets
import stat
import tempfile
from pathlib import Path

from trainer.errors import UserError
from trainer.fsutil import open_regular

TOKEN_HEX_CHARS = 64  # 256 bits


def new_token() -> str:
    return secrets.token_hex(TOKEN_HEX_CHARS // 2)


def write_token(path: Path, token: str, replace: bool) -> bool:
    """Write ``token`` to ``path`` with mode 0600 from the first byte on.

    ``replace``: overwrite any existing file (the launcher, once per run). Otherwise create the
    file only if it is absent (``os.link`` fails on an existing name, so two roles starting at
    once agree on one token). Returns whether this call wrote the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp: O_EXCL, mode 0600
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def read_token(path: Path) -> bytes:
    """The token as HMAC key bytes; refuses anything but a regular file of this user's that others
    cannot read, checked before a byte is read (a FIFO or /dev/zero must not hang or fill memory)."""
    path = Path(path)
    label = f"cluster.token_file {path}"
    try:
        handle, info = open_regular(path, label)
    except FileNotFoundError:
        raise UserError(f"{label}: not found") from None
    except OSError as exc:
        raise UserError(f"{label}: cannot read it ({exc.strerror})") from None
    with handle:
        if kubernetes_secret(info):
            pass  # root's file, read-only, readable by this pod's group only: a mounted Secret
        elif info.st_mode & 0o077:
            raise UserError(f"{label}: readable by others (mode {stat.S_IMODE(info.st_mode):04o}); it is the "
                            f"cluster's secret: chmod 600 {path}")
        elif info.st_uid != os.getuid():
            raise UserError(f"{label}: owned by uid {info.st_uid}, not this user ({os.getuid()})")
        text = handle.read(TOKEN_HEX_CHARS + 2).decode("ascii", errors="replace").strip()
    if not re.fullmatch(f"[0-9a-f]{{{TOKEN_HEX_CHARS}}}", text):
        raise UserError(f"{label}: expected {TOKEN_HEX_CHARS} hex digits (delete it and a role will write a new one)")
    return text.encode("ascii")


def kubernetes_secret(info: os.stat_result) -> bool:
    """A token a Kubernetes Secret volume mounts for a non-root pod (``unet-train manifests``:
    defaultMode 0400 and the pod's fsGroup): owned by root, which the kubelet makes readable to the
    fsGroup (0440), writable by no one and unreadable by others. Root's own file in this process's
    group is as trusted as this user's own 0600 file: root could read or replace either."""
    groups = {os.getgid(), *os.getgroups()}
    return info.st_uid == 0 and os.getuid() != 0 and not info.st_mode & 0o237 and info.st_gid in groups


def load_or_create_token(path: Path) -> bytes:
    """Read ``path``, creating it with a fresh token first if it does not exist yet."""
    if not Path(path).exists():
        write_token(Path(path), new_token(), replace=False)
    return read_token(Path(path))
