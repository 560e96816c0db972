"""Stand-ins for hardware libraries, so the real Python bindings above them run in tests."""
