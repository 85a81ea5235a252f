"""Benchmark suites: every encoder on every task, partition, seed and mode, as Ray tasks, resumed cell by cell,
summarised as the paper's table with intervals (``mpmae benchmark``)."""
