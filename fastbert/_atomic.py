"""Atomic file writes: write beside the target, fsync, then rename over it.

A reader (or a crash) sees the old file or the new one, never a half-written one.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

# How writers that are not Python's own report a write that failed (a full disk, a file-size limit):
# safetensors raises SafetensorError, torch.save a RuntimeError with one of these phrases.
_TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


@contextlib.contextmanager
def write_errors_as_os_errors(path: str | os.PathLike) -> Iterator[None]:
    """Inside: a failed write by safetensors or torch.save, or an OSError naming no file (numpy's), becomes
    an OSError naming ``path``, which the CLI reports in one line like any other write error."""
    try:
        yield
    except OSError as err:
        if err.filename is None:  # numpy's "119399 requested and 90048 written" names no file
            raise OSError(err.errno or errno.EIO, err.strerror or str(err), str(path)) from None
        raise
    except Exception as err:
        failed = type(err).__name__ == "SafetensorError" or (
            isinstance(err, RuntimeError) and any(phrase in str(err) for phrase in _TORCH_WRITE_FAILURES))
        if not failed:
            raise
        raise OSError(errno.EIO, f"write failed ({type(err).__name__}: {str(err).strip()[:200]}); is the disk full "
                                 "or a file-size limit reached?", str(path)) from None


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` for a temporary file in the target's folder, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with write_errors_as_os_errors(path):
            write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_file_mode())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
