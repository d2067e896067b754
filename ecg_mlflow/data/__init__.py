"""Data layer: class folders, manifest, hashes, splits, preprocessing, the Mendeley download.
Imports neither mlflow nor click."""
