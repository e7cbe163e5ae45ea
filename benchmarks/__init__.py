"""Benchmark scripts; ``python -m benchmarks`` runs the suite (see ``__main__``)."""
