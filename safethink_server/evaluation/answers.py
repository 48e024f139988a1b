"""Exact-answer scoring for reasoning problems: pull the final number out of a response and compare numerically."""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+"
_MARKED = [
    re.compile(r"\\boxed\{([^{}]*)\}"),
    re.compile(r"####\s*([^\n]+)"),
    re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:|=)\s*([^\n]+)", re.IGNORECASE),
]


def parse_number(text: str) -> Fraction | None:
    """The first number in `text`, with thousands separators, currency, percent signs and units ignored:
    '$1,234.50' -> 1234.5, '3/4 cup' -> 3/4, '-.5' -> -1/2. None when there is no number."""
    match = re.search(_NUMBER, text.replace("\u2212", "-"))
    if match is None:
        return None
    token = match.group(0).replace(",", "")
    try:
        return Fraction(token)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str) -> Fraction | None:
    """The number a response gives as its answer: a marked one (\\boxed{}, '####', 'the answer is')
    if present, the last such marker winning; otherwise the last number in the text."""
    for pattern in _MARKED:
        marked = [m.group(1) for m in pattern.finditer(text)]
        for candidate in reversed(marked):
            value = parse_number(candidate)
            if value is not None:
                return value
    numbers = re.findall(_NUMBER, text.replace("\u2212", "-"))
    for token in reversed(numbers):
        value = parse_number(token)
        if value is not None:
            return value
    return None


def answers_match(response: str, expected: str, tolerance: float = 1e-6) -> bool:
    """Does the response's final number equal the expected answer (relative tolerance for decimals)?"""
    want = parse_number(expected)
    got = extract_answer(response)
    if want is None or got is None:
        return False
    if want == got:
        return True
    return abs(float(got) - float(want)) <= tolerance * max(1.0, abs(float(want)))
