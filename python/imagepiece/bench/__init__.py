"""The benchmark suite behind scripts/benchmark.py: model variants, ways to run them, measurements
and reports. Kept in the package so each part stays small and testable; the script is only a CLI."""
