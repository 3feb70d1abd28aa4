"""One file per sparse-training method; ``secateurs.train.registry`` lists them by name."""
