"""Aggregator storage: ``Store`` (base.py) with SQLite and PostgreSQL backends, chosen by URL (``open_store``)."""
