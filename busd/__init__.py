"""busd: a small, durable message bus for AI agents."""

__version__ = "0.1.0"
