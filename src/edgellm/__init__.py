"""edgellm: split inference and training of causal language models across a device and edge servers."""

__version__ = "0.1.0"
