"""What the code mirror (rsync --delete into the workdir) must never touch: every path in settings.

The sync makes each host's workdir a mirror of this checkout, and rsync --delete removes what
the checkout lacks. Seen: with ``train.run_dir=experiments`` the old fixed list (``/runs/``,
``/data/``) let a sync delete ``experiments/exp1/checkpoints``, and the next launch restarted
at epoch 0. So every run and data path in settings that lies inside the workdir (relative
paths do: the roles run there) becomes an anchored rsync exclude, which also protects it from
--delete; one that cannot be expressed safely as a rule is refused.

"Inside" is decided on resolved paths, never on their text: a relative path is taken from the
folder it is used in, ``..`` and repeated slashes are folded, and symlinks that exist here are
followed (``../unet-train/experiments``, ``//srv/unet-train/experiments`` and a link into the
workdir all name the same folder to rsync).
"""
from __future__ import annotations

import os
from pathlib import Path

from trainer.config.settings import Settings
from trainer.data.prepared import DEFAULT_PARENT
from trainer.errors import UserError
from trainer.fsutil import folder_identity

RSYNC_WILDCARDS = set("*?[\\")


def settings_paths(settings: Settings) -> list[tuple[str, Path, bool]]:
    """(setting, path, is_folder) for every file or folder a run reads or writes on the hosts: the
    runs, the prepared datasets (the one named, and prepare's default parent with its record of the
    last one), the raw source when named, the token file."""
    data = settings.data
    paths = [("train.run_dir", settings.train.run_dir, True),
             ("prepared datasets (prepare's default --out)", DEFAULT_PARENT, True),
             ("cluster.token_file", Path(settings.cluster.token_file), False)]
    if data.dataset is not None:
        paths.append(("data.dataset", data.dataset, True))
    if data.source is not None:
        paths.append(("data.source", data.source, True))
    python = Path(settings.cluster.python)
    environment = python.parent.parent if python.parent.name == "bin" else python.parent
    if str(environment) not in ("", "."):
        # no trailing slash: an environment may be a symlink (a worktree's .venv), not only a folder
        paths.append(("cluster.python (its environment)", environment, False))
    return paths


def mirror_excludes(settings: Settings, workdir: str, source_root: Path) -> list[str]:
    """Anchored rsync excludes (``/experiments/``, ``/data2/brats.h5``) for the settings' paths
    inside the workdir (on the hosts) or inside this checkout (the mirror's source)."""
    excludes: list[str] = []
    for key, path, folder in settings_paths(settings):
        for base in (workdir, str(source_root)):
            for relative in _inside(path, base):
                if relative == ".":
                    raise UserError(f"{key}: {path} is the workdir itself ({base}); the code sync mirrors that "
                                    f"folder with rsync --delete. Use a folder inside it (e.g. runs) or outside it")
                if RSYNC_WILDCARDS & set(relative) or "\n" in relative:
                    raise UserError(f"{key}: {path} contains one of * ? [ \\ or a newline, which rsync reads as a "
                                    f"pattern, so the code sync cannot protect it; rename it")
                rule = "/" + relative + ("/" if folder else "")
                if rule not in excludes:
                    excludes.append(rule)
    return excludes


def _inside(path: Path, base: str) -> list[str]:
    """Every spelling, relative to ``base``, under which ``path`` lies inside ``base`` (``.`` for
    the base itself): lexically, and with symlinks that exist on this machine resolved. A relative
    path is taken from ``base``, where the roles run."""
    base_forms = {_fold(base), os.path.realpath(_fold(base))}
    lexical = _fold(os.path.join(base, str(path)))
    found: list[str] = []
    for candidate in dict.fromkeys((lexical, os.path.realpath(lexical))):
        for root in base_forms:
            if candidate == root:
                found.append(".")
            elif candidate.startswith(root.rstrip("/") + "/"):
                found.append(candidate[len(root.rstrip("/")) + 1:])
    by_folder = _inside_by_identity(lexical, base)
    if by_folder is not None:
        found.append(by_folder)
    return list(dict.fromkeys(found))


def _inside_by_identity(path: str, base: str) -> str | None:
    """``path`` relative to ``base`` when one of its parents (or itself) is the folder ``base`` by
    device and inode, whatever either is called: a bind mount of the workdir, or a parent reached
    through another mount, is the workdir. None when ``base`` does not exist here or holds no part
    of ``path``."""
    target = folder_identity(base)
    if target is None:
        return None
    current, below = Path(os.path.realpath(path)), []
    while True:
        if folder_identity(current) == target:
            return "/".join(reversed(below)) or "."
        if current.parent == current:
            return None
        below.append(current.name)
        current = current.parent


def _fold(text: str) -> str:
    """An absolute path with ``.``, ``..`` and repeated slashes folded (POSIX keeps a leading ``//``
    as it is; rsync and the kernel do not)."""
    folded = os.path.normpath(text)
    return "/" + folded.lstrip("/") if folded.startswith("/") else folded
