"""asv benchmark suites of tokenpool_ops (run from ``benchmarks/``, see asv.conf.json)."""
