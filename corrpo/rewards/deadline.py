"""A hard time budget for reward code, from the main thread, with sub-second precision, and nestable.

math-verify's own timeouts use ``signal.alarm``: whole seconds, one per parse or verify call, so a
completion that needs two parses and a verify can take three seconds, and every timeout logs the whole
offending string. Here math-verify runs with its timeouts off and one ``setitimer`` budget covers all the
work on one completion. The interrupt is a ``BaseException`` so that library code catching ``Exception``
cannot swallow it.

Budgets nest: the per-call reward deadline (``rl.reward_timeout_s``, :mod:`corrpo.rewards.combine`) surrounds
the accuracy reward's per-completion budget. The inner one arms the timer for whichever ends first, raises its
own exception only when its own budget is spent (else it hands the alarm to the outer handler, which raises the
outer's), and re-arms the outer's remaining time when it ends. Each budget raises its own class, so the accuracy
reward's ``except DeadlineExceeded`` never swallows the outer reward deadline.

Off the main thread signals are unavailable: the budget is not enforced there (``deadline`` yields False), and
callers bound the input size instead.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class DeadlineExceeded(BaseException):  # noqa: N818 - an interrupt, like KeyboardInterrupt
    """Raised inside the ``deadline`` block when its time budget is spent."""


@contextmanager
def deadline(seconds: float | None, exception: type[BaseException] = DeadlineExceeded) -> Iterator[bool]:
    """Interrupt the block with ``exception`` after ``seconds`` (wall clock; None or <= 0: no budget).

    Yields whether the budget is enforced (main thread only). Restores any previous handler and re-arms an
    enclosing budget's remaining time.
    """
    if seconds is None or seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield False
        return
    now = time.monotonic()
    end = now + seconds
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    outer_end = now + outer_left if outer_left > 0 else None
    previous = signal.getsignal(signal.SIGALRM)
    outer_first = outer_end is not None and outer_end < end and callable(previous)

    def _fire(signum, frame) -> None:
        if outer_first:
            previous(signum, frame)  # the enclosing budget ran out first: its handler raises its exception
        raise exception

    signal.signal(signal.SIGALRM, _fire)
    signal.setitimer(signal.ITIMER_REAL, (outer_end if outer_first else end) - now)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_end is not None:  # the enclosing budget keeps its own end (fires at once if already past)
            signal.setitimer(signal.ITIMER_REAL, max(outer_end - time.monotonic(), 1e-6))
