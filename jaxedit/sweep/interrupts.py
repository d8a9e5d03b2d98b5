"""SIGINT and SIGTERM as an exception on the main thread that nothing can drop.

A Python signal handler runs at the next bytecode the main thread executes, which may belong to a
garbage-collector callback (JAX registers one) or a finalizer; Python prints and drops an exception
raised there, and the run would go on as if no signal had come. Such a dropped `Interrupted` is
caught by `sys.unraisablehook` and simulated again a moment later, once that callback has returned.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
RETRY_S = 0.01  # after a dropped Interrupted, when the signal is simulated again


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; `status` is the exit status (128 + the signal)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.status = signum, 128 + signum


def _raise(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def raised_on_signals():
    """Inside the block, SIGINT and SIGTERM raise `Interrupted` on the main thread."""
    retries = []  # timers simulating again a signal whose Interrupted was dropped

    def redeliver(unraisable):
        if not isinstance(unraisable.exc_value, Interrupted):
            return previous_hook(unraisable)
        retry = threading.Timer(RETRY_S, _thread.interrupt_main, (unraisable.exc_value.signum,))
        retry.daemon = True
        retries.append(retry)
        retry.start()

    previous = {signum: signal.signal(signum, _raise) for signum in SIGNALS}
    previous_hook, sys.unraisablehook = sys.unraisablehook, redeliver
    try:
        yield
        if retries:  # the block ended before a simulated signal came (or its Interrupted was dropped again)
            raise Interrupted(retries[-1].args[0])
    finally:
        for retry in retries:
            retry.cancel()
        sys.unraisablehook = previous_hook
        for signum, earlier in previous.items():
            signal.signal(signum, earlier)
