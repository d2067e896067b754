"""Model layer: the backbone registry, the feature cache, the head, the whole model and its
evaluation. Imports neither mlflow nor click; Keras and TensorFlow only inside functions."""
