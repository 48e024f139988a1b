"""The HTTP side: OpenAI-compatible routes, request checks, streaming, errors, keys, audit and lifecycle."""
