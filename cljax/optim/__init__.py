"""Continual-learning optimizers as optax transforms: OSF, GaLore, GORP, regularizers."""
