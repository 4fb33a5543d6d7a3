"""The asv suite: kernel throughput and one small end-to-end W1, tracked over commits.

Lives in its own package so that asv, which imports every module under its
``benchmark_dir``, never imports the workload scripts beside it. See
docs/benchmarks.md.
"""
