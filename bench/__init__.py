"""The benchmark harness: ``python -m lowmem.bench {train,micro}`` and pytest-benchmark suites."""
