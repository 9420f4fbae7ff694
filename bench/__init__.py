"""Benchmarks of metapool_kernels: op suites, the Meta-Pooling paper's Table 1 and Table 4 with
measured latency, training steps, CPU rows, and the report generator (``python -m bench.report``).

See bench/README.md for how to run them and how the numbers are taken.
"""
