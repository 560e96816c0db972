"""The interface every source implements, and the registry that the agent builds sources from."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

from collector.readings import DeviceInfo, DeviceReading, DeviceStatus

if TYPE_CHECKING:
    from collector.config import AgentConfig


class Source:
    """A producer of energy readings for a set of devices.

    Lifecycle: ``open()`` discovers devices (raises ``SourceUnavailable`` when the hardware or library is absent),
    then ``read()`` is called every ``interval_s`` and ``read_status()`` every ``slow_interval_s`` (when not None),
    each from its own thread, and finally ``close()``.

    ``read()`` returns one reading per device that answered; a device missing from the result is down for that
    read (``device_errors`` says why). It raises ``SourceError`` only when the source as a whole failed.
    """

    name: ClassVar[str] = ""
    interval_s: float = 0.1
    slow_interval_s: float | None = None

    def open(self) -> None:
        """Discover devices; raise SourceUnavailable if there is nothing to measure here."""

    def devices(self) -> Sequence[DeviceInfo]:
        raise NotImplementedError

    def read(self) -> Sequence[DeviceReading]:
        raise NotImplementedError

    def read_status(self) -> Sequence[DeviceStatus]:
        return ()

    def device_errors(self) -> dict[str, str]:
        """Devices that did not answer at the last read, with the reason."""
        return {}

    def close(self) -> None:
        """Release what ``open`` acquired."""


SourceFactory = Callable[["AgentConfig"], "Source | None"]

_REGISTRY: dict[str, SourceFactory] = {}


def register_source(name: str) -> Callable[[SourceFactory], SourceFactory]:
    """Register a factory that builds the source from the config, or returns None when it is disabled."""

    def wrap(factory: SourceFactory) -> SourceFactory:
        if name in _REGISTRY:
            raise ValueError(f"source {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def registered_sources() -> dict[str, SourceFactory]:
    return dict(_REGISTRY)
