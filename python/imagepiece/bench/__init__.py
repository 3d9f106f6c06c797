"""Benchmarks of the ImagePiece family: one CLI (`python -m imagepiece.bench MODE`, see `cli`), its
modes (one module each, listed in `cli.MODES`: suite, compile, ..., e2e), the ways to run a model (`paths`), the models compared
(`variants`), one timing helper (`timing`) and one results writer (`results`)."""
