"""Optuna search spaces, one per built-in policy."""
