"""Bytes, messages and transports. Knows nothing of models beyond tensor shapes."""
