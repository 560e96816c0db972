"""Energy sources. Importing this package registers the built-in ones, in the order the agent opens them."""

from collector.sources import cpu_model, nvml, rapl, simulated
from collector.sources.base import Source, register_source, registered_sources

BUILTIN_ORDER = ("nvml", "rapl", "simulated", "cpu_model")

__all__ = [
    "BUILTIN_ORDER",
    "Source",
    "cpu_model",
    "nvml",
    "rapl",
    "register_source",
    "registered_sources",
    "simulated",
]
