"""Model building blocks: backbones and their weights."""
