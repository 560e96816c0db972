"""Wattmeter: energy telemetry for AI datacenters."""

__version__ = "0.1.0"
