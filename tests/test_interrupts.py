"""A signal whose handler runs inside a garbage-collector callback (where Python drops exceptions)
still stops the sweep's main thread."""

import gc
import signal
import sys
import time

import pytest

from jaxedit.sweep.interrupts import RETRY_S, Interrupted, raised_on_signals


def _signal_in_gc_callback(signum: int) -> tuple:
    """(callback, finished): a gc callback that raises `signum` once, and the list it appends to after that."""
    armed, finished = [True], []

    def callback(phase, info):
        if phase == "start" and armed:
            armed.clear()
            signal.raise_signal(signum)  # its handler runs here, in the callback: the exception is dropped
            finished.append(sum(range(100)))  # not reached: the handler raised on this line's bytecode

    return callback, finished


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_handled_inside_a_gc_callback_still_raises_in_the_main_thread(signum, capsys):
    callback, finished = _signal_in_gc_callback(signum)
    before, hook = signal.getsignal(signum), sys.unraisablehook
    gc.callbacks.append(callback)
    ticks = 0
    try:
        with pytest.raises(Interrupted) as stop:
            with raised_on_signals():
                gc.collect()
                assert not finished, "the handler did not run inside the callback"
                for ticks in range(300):  # the signal comes again during this loop, not at the block's end
                    time.sleep(0.01)
    finally:
        gc.callbacks.remove(callback)
    assert stop.value.status == 128 + signum
    assert ticks < 299
    assert "Interrupted" not in capsys.readouterr().err  # no "Exception ignored" traceback either
    assert signal.getsignal(signum) is before and sys.unraisablehook is hook  # both restored


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_dropped_just_before_the_block_ends_raises_as_it_ends(signum):
    callback, finished = _signal_in_gc_callback(signum)
    gc.callbacks.append(callback)
    try:
        with pytest.raises(Interrupted) as stop:
            with raised_on_signals():
                gc.collect()  # dropped here; the block ends before the signal is simulated again
        assert not finished and stop.value.status == 128 + signum
        time.sleep(10 * RETRY_S)  # the cancelled retry never comes (it would interrupt this test)
    finally:
        gc.callbacks.remove(callback)
