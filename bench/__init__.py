"""Benchmarks of the SRMF engine (run with ``python -m bench.<name>``; see bench/README.md)."""
