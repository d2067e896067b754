"""Datasets: class folders, manifests, content hashes, near duplicates, splits."""
