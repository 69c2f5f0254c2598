"""Ctrl-C (SIGINT) and SIGTERM as requests to stop between steps, so the checkpoint written on the way
out holds a state that ``--resume`` continues exactly (no half-done step, no RNG draws of a lost step).

A second signal stops at once (KeyboardInterrupt), as Ctrl-C normally does.
"""
from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """A context manager: while active, the first SIGINT/SIGTERM only sets :attr:`signal`."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signal).name if self.signal is not None else None

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signal = signum

    def __enter__(self) -> StopRequests:
        # Handlers can only be set from the main thread; elsewhere (a notebook worker) signals keep theirs.
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
