"""Models: backbones, the feature cache and its stores, the head, the whole model."""
