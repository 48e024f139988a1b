"""Evaluation against any OpenAI-compatible server: suites, judges, the runner, reports, prefix search."""


class EvaluationError(ValueError):
    """A configuration that cannot run: unknown suite, malformed suite file, a judge without its model."""
