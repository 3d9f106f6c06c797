#!/bin/sh
# Stands in for cpp/bench's bench_runtime in the benchmark CLI's tests: what the real one prints without arguments.
echo "usage: bench_runtime ARTIFACT.so [--benchmark_* flags]" >&2
exit 2
