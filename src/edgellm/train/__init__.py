"""Fine-tuning: built-in tasks, datasets and deterministic batches, and the training loop."""
