"""Synthetic 12-lead reports in the Mendeley folder layout, for offline demos and tests."""
