"""safethink-server: inference-time safety steering for reasoning models."""

__version__ = "0.1.0"
