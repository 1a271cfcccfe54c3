"""edgellm: take a language model and make it run well on a specific edge device."""

__version__ = "0.1.0"
