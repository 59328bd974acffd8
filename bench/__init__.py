"""Benchmarks and measurements run by hand (python -m bench.<name>); never part of the test suite."""
