"""The benchmark harness of ``make bench`` (not part of the installed package): one
measured case (``measure``), a model behind vLLM's server (``served``), and the tables
of BENCHMARKS.md (``tables``). The scripts beside this folder import it."""
