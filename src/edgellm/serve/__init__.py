"""Engines that turn a request into a generation: in one process now, over a deployment later."""
