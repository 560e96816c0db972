"""The central aggregator: receives agents' gRPC streams, validates and stores them, serves fleet energy."""
