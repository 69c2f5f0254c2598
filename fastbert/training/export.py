"""Atomic folder export (a trained model + tokenizer): written into a hidden sibling folder, then renamed
into place, so a reader never sees a half-written model and a failed save leaves the old output intact.

The swap is two renames (old output aside, new one in), then the old one is deleted. A save that fails
(a full disk, a read-only folder, Ctrl-C) removes its staging folder and raises an OSError naming the
target. Only a process killed between the two renames can leave the target missing; the old and the
new output are then both beside it, as hidden ``.NAME.tmp-*`` folders.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

STAGING_INFIX = ".tmp-"


def _default_dir_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def check_replaceable(target: Path, names: Iterable[str]) -> None:
    """Refuse an output that an export of the files ``names`` would lose something of: a file, or a
    folder that holds anything else. Absent and empty folders are fine."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file; give a folder for the output")
    if target.is_dir():
        names = set(names)
        foreign = sorted(p.name for p in target.iterdir() if p.name not in names or not p.is_file())
        if foreign:
            raise ValueError(f"{target} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which "
                             "the export would delete: choose another output folder, or empty this one")


def staging_prefix(target: Path) -> str:
    return f".{Path(target).name}{STAGING_INFIX}"


def remove_stale_staging(target: Path) -> None:
    """Drop what exports to ``target`` that were killed midway left beside it. Only for a caller that owns
    the folder (holds its lock): another process's export in progress would go too."""
    target = Path(target)
    if target.parent.is_dir():
        for stale in target.parent.glob(staging_prefix(target) + "*"):
            shutil.rmtree(stale, ignore_errors=True)


def export_folder(target: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(folder)`` for a fresh hidden folder beside ``target``, then swap it in for ``target``
    (whatever that folder held is replaced: check it first with :func:`check_replaceable`)."""
    target = Path(target)
    if target.is_symlink():
        target = target.resolve()  # replace what the link points to, not the link
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix(target), dir=target.parent))
        os.chmod(staging, _default_dir_mode())  # mkdtemp makes it private; the output gets the usual mode
        write(staging)
        _fsync_files(staging)
        old = staging.with_name(staging.name + ".old")
        if target.exists():
            os.replace(target, old)
        try:
            os.replace(staging, target)
        except BaseException:
            if old.exists():
                os.replace(old, target)  # the previous output back in place
            raise
    except BaseException as err:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"cannot write the model ({err.strerror or err})", str(target)) from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


def _fsync_files(folder: Path) -> None:
    """The files on disk before the rename makes them the output (a crash must not publish empty files)."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
