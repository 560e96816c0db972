"""The error hierarchy. Hardware errors are mapped to these at each source's boundary."""

from __future__ import annotations


class WattmeterError(Exception):
    """Base of every error Wattmeter raises on purpose."""


class ConfigError(WattmeterError):
    """The configuration is wrong; the message says which key and how to fix it."""


class SourceUnavailable(WattmeterError):
    """The hardware or library behind a source is not present on this host (not a failure)."""


class SourceError(WattmeterError):
    """A read from a source failed."""


class PermissionDeniedError(SourceError):
    """A sensor exists but this process may not read it; the message names the fix."""


class DeviceLost(SourceError):
    """One device stopped answering (a GPU fell off the bus, a zone vanished)."""

    def __init__(self, device_id: str, reason: str) -> None:
        super().__init__(f"{device_id}: {reason}")
        self.device_id = device_id
        self.reason = reason


class RegistrationSocketError(WattmeterError):
    """The registration socket cannot be set up (path in use by a live agent, not a socket, not writable)."""
