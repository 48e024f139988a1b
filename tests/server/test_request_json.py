"""The strict reading of request bodies, as properties over generated JSON and bytes."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from safethink_server.api.request_json import MAX_DEPTH, BadRequestJSON, parse_request_json
from safethink_server.schema import INT64_MAX, INT64_MIN

INT64 = st.integers(INT64_MIN, INT64_MAX)
SCALARS = st.none() | st.booleans() | INT64 | st.floats(allow_nan=False, allow_infinity=False) | st.text()
JSON = st.recursive(SCALARS, lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
                    max_leaves=30)


def depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


def nest(value: object, levels: int, in_object: bool) -> object:
    for _ in range(levels):
        value = {"k": value} if in_object else [value]
    return value


@given(JSON, st.booleans())
def test_valid_json_within_the_bounds_reads_back_unchanged(value, ascii_only):
    assert parse_request_json(json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")) == value


@given(JSON, st.integers(MAX_DEPTH - 4, MAX_DEPTH + 2), st.booleans())
def test_nesting_is_refused_exactly_beyond_the_limit(value, levels, in_object):
    nested = nest(value, levels, in_object)
    body = json.dumps(nested).encode()
    if depth(nested) <= MAX_DEPTH:
        assert parse_request_json(body) == nested
    else:
        try:
            parse_request_json(body)
        except BadRequestJSON as exc:
            assert exc.status_code == 400 and "levels deep" in exc.detail
        else:
            raise AssertionError("a body nested beyond the limit was read")


@given(JSON, st.integers(0, 3), st.one_of(st.integers(INT64_MAX + 1, 2**200), st.integers(-(2**200), INT64_MIN - 1)))
def test_integers_beyond_64_bits_are_refused_with_their_path(value, levels, big):
    body = json.dumps({"x": nest([value, big], levels, True)}).encode()
    try:
        parse_request_json(body)
    except BadRequestJSON as exc:
        assert exc.param == "x" + ".k" * levels + "[1]" and "64 bits" in exc.detail
    else:
        raise AssertionError(f"{big} was read")


@given(JSON, st.integers(0xD800, 0xDFFF), st.booleans())
def test_a_lone_surrogate_anywhere_is_refused(value, code, as_key):
    lone = chr(code)
    body = json.dumps({"v": value, **({lone: 1} if as_key else {"s": "a" + lone})}).encode()  # json escapes it: \\udxxx
    try:
        parse_request_json(body)
    except BadRequestJSON as exc:
        assert "surrogate" in exc.detail
    else:
        raise AssertionError("a lone surrogate was read")


@given(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400"]))
def test_numbers_that_are_not_finite_are_refused(number):
    try:
        parse_request_json(f'{{"temperature": {number}}}'.encode())
    except BadRequestJSON:
        pass
    else:
        raise AssertionError(f"{number} was read")


@settings(max_examples=300)
@given(st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()[: len(json.dumps(v)) // 2]))
def test_any_bytes_are_read_or_refused_with_a_400_never_another_error(body):
    try:
        parse_request_json(body)
    except BadRequestJSON as exc:
        assert exc.status_code == 400 and exc.detail
