"""fastdl benchmarks: every case defined once (bench/cases/), timed by the runner
(``python -m bench``) and by the pytest-benchmark suites (``pytest bench/ --benchmark-only``)."""
