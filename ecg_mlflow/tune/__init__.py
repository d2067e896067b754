"""Optuna search over the head: the search space and storage (search.py), the tracked
objective and its logging (tracking.py)."""
