"""The inference benchmark behind BENCHMARKS.md: measurements and their tables."""
