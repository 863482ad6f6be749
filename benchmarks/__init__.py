"""Benchmarks of casfs against the alternatives: cold start of Python imports
(`python -m benchmarks.coldstart`), indexing throughput (`python -m benchmarks.indexing`)
and the read path (`python -m benchmarks.readpath`). See docs/benchmarks.md."""
