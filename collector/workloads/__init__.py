"""Workload attribution: which workload each process belongs to (``procfs`` scans, ``resolve`` names them)."""
