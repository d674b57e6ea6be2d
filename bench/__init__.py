"""Host timing harness, device cost model and pytest-benchmark suites."""
