"""Tests of the benchmark suite behind ``udskit bench`` (never of its timing figures)."""
