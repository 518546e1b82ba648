"""cljax: continual fine-tuning of language models in JAX/Flax."""

__version__ = "0.1.0"
