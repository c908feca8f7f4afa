"""Stopping cleanly on SIGTERM and SIGINT.

Schedulers (SLURM, Kubernetes, spot instances) send SIGTERM some time before they kill. While a `StopRequest` is
installed, the first SIGTERM or SIGINT only sets it: the training loop finishes its optimiser step, writes a
checkpoint and raises `TrainingInterrupted`, which the CLI turns into exit status 128 + signal (143, 130). A
second signal raises `StopNow` at once.
"""
from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from t2i.errors import T2IError

HANDLED = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(T2IError):
    """Training stopped on a signal after saving its state; the message says where and how to continue."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    def __reduce__(self):  # rebuilt in the launching process when raised in a local worker
        return type(self), (self.signum, str(self))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopNow(BaseException):
    """A second signal: leave at once, running only `finally` blocks (lock release, temporary files)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopRequest:
    """Whether a stop was asked for, by a signal to this process or, through `shared`, to its launcher.

    `shared` is a multiprocessing Value('i') that a launching process sets for its local workers, so that a
    signal sent to it alone reaches them once, not twice.
    """

    def __init__(self, shared=None):
        self._signum: int | None = None
        self._shared = shared
        # A signal delivered to this very process before: the next one stops at once. Not the shared stop: Ctrl-C
        # in a terminal signals the launcher and its workers together, and that is one request, not two.
        self._signalled_here = False

    @property
    def signum(self) -> int | None:
        if self._signum is None and self._shared is not None and self._shared.value:
            self._signum = self._shared.value
        return self._signum

    def _handle(self, signum: int, frame) -> None:
        if self._signalled_here:
            raise StopNow(signum)
        self._signalled_here = True
        if self.signum is not None:  # already asked for through the shared stop: the same request
            return
        self._signum = signum
        if self._shared is not None:
            self._shared.value = signum
        print(f"t2i: {signal_name(signum)} received: finishing the current step, then saving a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        """Handle SIGTERM and SIGINT with this request inside the block (main thread only, as Python allows)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.getsignal(signum) for signum in HANDLED}
        for signum in HANDLED:
            signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
