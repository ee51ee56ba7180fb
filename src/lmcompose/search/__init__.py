"""Automatic composition: search space, objective levels and the Optuna/Ray study (issue 6)."""
