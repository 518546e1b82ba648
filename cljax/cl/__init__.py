"""The continual loop: methods, training, evaluation, metrics, checkpoints."""
