"""Ctrl-C (SIGINT) and SIGTERM as requests to stop between steps, so the checkpoint written on the way
out holds a state that ``--resume`` continues exactly (no half-done step, no RNG draws of a lost step).

Until the training loop starts (data preparation, set-up: minutes to hours on a real corpus) there is
nothing to save, so a signal stops at once. In the loop the first signal is a request; a second one
stops at once, as Ctrl-C normally does, the exit checkpoint then being written included.
"""
from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopNow(KeyboardInterrupt):
    """A signal that cannot wait (during set-up, or a second one): raised where the program is."""

    def __init__(self, signum: int, when: str) -> None:
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} received {when}")


class StopRequests:
    """A context manager: while active, SIGINT/SIGTERM raise :class:`StopNow`, except the first one after
    :meth:`defer`, which only sets :attr:`signal`."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._deferring = False
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signal).name if self.signal is not None else None

    def defer(self) -> None:
        """From here on (the training loop) a first signal waits for the step to end."""
        self._deferring = True

    def _handle(self, signum, frame) -> None:
        if not self._deferring:
            self.signal = signum
            raise StopNow(signum, "during set-up: stopped before training, nothing to save")
        if self.signal is not None:
            raise StopNow(signum, "again: stopped at once (a checkpoint being written is dropped; the older "
                                  "ones are intact)")
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
