"""One run per output folder (``fastbert pretrain`` and ``fastbert prepare``): an exclusive ``flock`` on
``OUT/.lock``, which holds the owner's pid and host.

The kernel drops the lock when its process ends in any way (kill -9 included), so a stale lock file
never blocks the next run.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"


class FolderLockedError(ValueError):
    """Another process holds the output folder."""


class FolderLock:
    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self._read_owner(fd)
            os.close(fd)
            raise FolderLockedError(f"{self.path.parent} is in use by another run ({owner}): wait for it to end, "
                                    "or choose another --out") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        self._fd = fd

    @staticmethod
    def _read_owner(fd: int) -> str:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        return text or "pid unknown"

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            # Unlock explicitly: forked DataLoader workers share the descriptor, so closing ours alone
            # would leave the folder locked until they exit.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
