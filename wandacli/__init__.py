"""wandacli: find which weights of a chat model carry its safety behaviour."""

__version__ = "0.1.0"
