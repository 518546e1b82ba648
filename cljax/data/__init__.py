"""The continual-learning benchmark: task registry, prompts, sources and token batches."""
