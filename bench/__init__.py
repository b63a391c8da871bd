"""Benchmarks that print RESULT name=value lines; they never pass or fail on time."""
