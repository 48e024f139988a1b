"""Helpers the tests share, and the benches may import: real server processes, metrics, streams."""
