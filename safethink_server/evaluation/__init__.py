"""Evaluation against any OpenAI-compatible server: suites, judges, the runner, reports, prefix search."""
