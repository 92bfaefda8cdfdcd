"""How a command stops: Ctrl-C, SIGTERM and SIGHUP as KeyboardInterrupt, and under DVC with its `dvc` process.

DVC passes no signal on to its stage, so a stage (train, evaluate, aggregate: any `digitgen` command DVC runs)
asks the kernel for SIGTERM when its parent dies (Linux `PR_SET_PDEATHSIG`); dvc.yaml starts those commands
with `exec`, so that parent is `dvc` itself and not a shell that outlives it. The seed workers of the processes
executor ask the same of the trainer that started them.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import sys

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG, _PR_GET_PDEATHSIG = 1, 2  # Linux prctl(2): the signal this process gets when its parent dies


def _raise_keyboard_interrupt(signum, frame):
    for stop in STOP_SIGNALS:  # a second signal must not interrupt the cleanup (checkpoint kept, run marked KILLED)
        signal.signal(stop, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def stopped_by_signals(die_with_parent: bool):
    """Ctrl-C, SIGTERM and SIGHUP (unless ignored, as under nohup) end the with block as KeyboardInterrupt.

    With die_with_parent (Linux) the process also gets SIGTERM when its parent dies: a stage under DVC, so
    `kill <dvc pid>` never leaves an orphan writing outputs DVC will not record, and each seed worker of the
    processes executor, so a trainer killed with -9 leaves none either. Nested use restores what it found.
    """
    previous = {stop: signal.getsignal(stop) for stop in STOP_SIGNALS}
    for stop, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(stop, _raise_keyboard_interrupt)
    with_parent = sys.platform == "linux" and die_with_parent
    if with_parent:
        before = ctypes.c_int(0)
        ctypes.CDLL(None).prctl(_PR_GET_PDEATHSIG, ctypes.byref(before))
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    try:
        yield
    finally:
        if with_parent:
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, before.value)
        for stop, handler in previous.items():
            signal.signal(stop, handler)
