"""Data layer: class folders, the manifest and its hashes, splits, preprocessing, the
Mendeley download. Imports neither mlflow nor click."""
