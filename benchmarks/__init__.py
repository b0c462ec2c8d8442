"""Benchmarks: one bench_<op>.py per op, sharing harness.py; `make bench` runs suite.py."""
