"""Engines behind one contract: the embedded transformers model, vLLM in-process, and a proxy to an upstream."""
