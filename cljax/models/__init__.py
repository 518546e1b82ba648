"""Flax NNX models (LLaMA, T5), LoRA adapters, HF conversion and generation."""
