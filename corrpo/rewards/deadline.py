"""A hard per-call time budget for reward code, from the main thread, with sub-second precision.

math-verify's own timeouts use ``signal.alarm``: whole seconds, one per parse or verify call, so a
completion that needs two parses and a verify can take three seconds, and every timeout logs the whole
offending string. Here math-verify runs with its timeouts off and one ``setitimer`` budget covers all the
work on one completion. The interrupt is a ``BaseException`` so that library code catching ``Exception``
cannot swallow it. Off the main thread signals are unavailable: the budget is not enforced there, and
callers bound the input size instead.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class DeadlineExceeded(BaseException):  # noqa: N818 - an interrupt, like KeyboardInterrupt
    """Raised inside the ``deadline`` block when its time budget is spent."""


def _raise(signum, frame) -> None:
    raise DeadlineExceeded


@contextmanager
def deadline(seconds: float) -> Iterator[bool]:
    """Interrupt the block with :class:`DeadlineExceeded` after ``seconds`` (wall clock).

    Yields whether the budget is enforced (main thread only). Restores any previous handler and timer.
    """
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield False
        return
    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
