"""Where batches are checked (``checks.check``): on the event loop (``InlineChecker``) or in worker processes
(``ProcessChecker``, ``processes.py``)."""

from __future__ import annotations

import abc

from collector.aggregator.checks import Checked, Limits, check
from collector.errors import WattmeterError


class CheckFailed(WattmeterError):
    """The batch could not be checked (not: it is invalid); nothing is acknowledged and the agent sends it again."""


class Checker(abc.ABC):
    async def start(self) -> None:  # noqa: B027 (a hook: most checkers need no start)
        """Get ready to check (on the event loop that will call ``check``)."""

    @abc.abstractmethod
    async def check(self, data: bytes, received_ns: int) -> Checked:
        """``checks.check`` of ``data``; raises what it raises, or ``CheckFailed``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop; batches being checked fail with ``CheckFailed``."""


class InlineChecker(Checker):
    """Checks each batch on the caller's thread (the event loop): no worker processes."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    async def check(self, data: bytes, received_ns: int) -> Checked:
        return check(data, received_ns, self.limits)

    async def close(self) -> None:
        pass
