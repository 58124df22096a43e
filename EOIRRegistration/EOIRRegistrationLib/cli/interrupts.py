"""SIGINT (Ctrl-C) and SIGTERM as one exception, so a command ends with one line and the usual
exit status (128 + the signal number: 130, 143) after its ``finally`` blocks cleaned up.

Python runs signal handlers in the main thread between bytecodes: a handler that raises unwinds
the command like any error (staging folders deleted, locks released). ``deferred()`` holds the
exception back around steps that must not stop halfway, such as the swap of an output folder: it
is raised when the step ends. (The handler keeps it rather than ``pthread_sigmask``: a mask
covers one thread, and torch's and the writers' threads would still take the signal.)
"""
from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None))
                if s is not None)


class Interrupted(BaseException):  # not Exception: ``except Exception`` must not swallow it
    """The command got SIGINT or SIGTERM. ``committed``: its outputs were already in place
    (set by ``outputfolder.OutputFolder`` when the signal came after the swap)."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.committed = False

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


_state = {"deferring": 0, "pending": None}


def _raise(signum, frame):
    if _state["deferring"]:
        _state["pending"] = _state["pending"] or signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def raise_on_signals():
    """SIGINT and SIGTERM raise ``Interrupted`` inside the block (main thread only; elsewhere
    the block runs with the handlers as they were)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _state["pending"] = None


@contextlib.contextmanager
def deferred():
    """SIGINT and SIGTERM (with ``raise_on_signals``' handler) raise when the block ends."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
    if not _state["deferring"] and _state["pending"]:
        signum, _state["pending"] = _state["pending"], None
        raise Interrupted(signum)


def message(prog: str, exc: Interrupted, out) -> str:
    """The one line a command prints when interrupted."""
    if exc.committed:
        return f"{prog}: interrupted after the outputs were written to {out} (complete)"
    return f"{prog}: interrupted; nothing written ({out} is as it was)"
