from fractions import Fraction

import pytest

from safethink_server.evaluation.answers import answers_match, extract_answer, parse_number


@pytest.mark.parametrize(("text", "value"), [
    ("$1,234.50", Fraction("1234.5")), ("£58", 58), ("-.5", Fraction(-1, 2)), ("3/4 cup", Fraction(3, 4)),
    ("12.5%", Fraction("12.5")), ("\u22127 degrees", -7), ("no number", None),
])
def test_parse_number_ignores_separators_currency_and_units(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize(("response", "value"), [
    ("So he has 40 - 2 = 38 left.\n#### 38\nThe answer is: 38", 38),
    ("First 3 + 4 = 7, then the answer is $1,200.", 1200),
    ("We get \\boxed{42} after checking 17 cases.", 42),
    ("2 + 2 = 4, and 4 * 3 = 12", 12),  # no marker: the last number
    ("The answer is 7. Then some chatter about 3 apples.", 7),  # a marker beats later numbers
    ("nothing numeric", None),
])
def test_extract_answer_prefers_marked_answers(response, value):
    assert extract_answer(response) == value


def test_answers_match_normalises_both_sides():
    assert answers_match("#### 1,000", "1000")
    assert answers_match("The answer is 2.50 dollars", "2.5")
    assert answers_match("the answer is 0.3333333333", "1/3", tolerance=1e-6)
    assert not answers_match("#### 218", "472")
    assert not answers_match("", "4")
