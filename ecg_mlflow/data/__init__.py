"""Data layer: class folders, the manifest and its content hashes, near duplicates, splits,
preprocessing, the Mendeley download. Imports neither mlflow nor click."""
