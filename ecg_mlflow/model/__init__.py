"""The model layer: backbones, features, heads and whole-model assembly."""
