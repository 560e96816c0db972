"""Work run by several threads at once, their exceptions collected for the test to check."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_in_threads(work: Callable[[int], None], count: int, timeout_s: float) -> list[BaseException]:
    """``work(0)`` to ``work(count - 1)``, each in a thread of its own, all started then each joined within
    ``timeout_s``; the exceptions they raised."""
    errors: list[BaseException] = []

    def guarded(n: int) -> None:
        try:
            work(n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)
    return errors
