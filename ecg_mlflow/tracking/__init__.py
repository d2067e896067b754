"""Tracking layer: every MLflow helper (opening, ending and searching runs, logging params
once, logging the model, bounded retries against a gone server)."""
