"""vaebench: a reproducible DVC + MLflow pipeline comparing variational autoencoders on MNIST."""
