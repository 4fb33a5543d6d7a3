"""Operator and measurement commands: bench, soak, stats, message formatting."""
