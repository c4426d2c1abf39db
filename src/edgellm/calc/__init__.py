"""Closed-form memory and trainable parameters of fine-tuning or serving a model, whole or split over nodes."""
