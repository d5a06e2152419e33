"""tailgate: a resumable streaming gateway for LLM responses. This package is what the gateway and
the worker share: settings, the Redis key layout, the event codec, the stream store and the CLI."""

__version__ = "0.1.0"
