import pytest

from circuits.measure.parsing import parse_number, parse_yes_no

NUMBER_CASES = [
    # plain, currency, separators, decimals
    ("42", 42.0),
    (" 50,000", 50000.0),
    ("$40,000", 40000.0),
    ("$40,000.50 is fair", 40000.5),
    ("USD 1,250", 1250.0),
    ("US$300", 300.0),
    ("€1.5k", 1500.0),
    ("I would offer 35000 dollars.", 35000.0),
    ("$.50", 0.5),
    ("12.", 12.0),
    ("100.", 100.0),
    ("$150.50", 150.5),
    ("$5,000.00", 5000.0),
    ("1,000", 1000.0),
    ("1.5k", 1500.0),
    ("1.5 million", 1_500_000.0),
    ("50%", 50.0),
    ("1,5", 1.0),  # a comma that is not a thousands group ends the number
    ("40,0000", 40.0),
    # multipliers
    ("$45k", 45000.0),
    ("45 K", 45000.0),
    ("45km away", 45.0),
    ("2.5 million", 2_500_000.0),
    ("$2M", 2_000_000.0),
    ("3bn", 3e9),
    ("5 B-grade", 5.0),  # a detached capital letter is not a multiplier
    ("5 hundred", 500.0),
    ("60 thousand dollars", 60000.0),
    # percentages as written
    ("75%", 75.0),
    ("about 75 percent", 75.0),
    # ranges: midpoint
    ("$40,000-$50,000", 45000.0),
    ("$40,000 - $50,000", 45000.0),
    ("40–50", 45.0),
    ("between 40 and 50", 45.0),
    ("Between $40,000 and $60,000.", 50000.0),
    ("from 10 to 20 percent", 15.0),
    ("40-50k", 45000.0),
    ("$500-1k", 750.0),  # the upper multiplier does not scale a lower end that would exceed it
    ("40%-60%", 50.0),
    ("40 and then some", 40.0),  # 'and' links a range only after 'between'
    ("a 40-year-old", 40.0),
    # signs and bullets
    ("-5", -5.0),
    ("-$5", -5.0),
    ("$-5", -5.0),
    ("−3.5", -3.5),
    ("- $500", 500.0),  # a bullet, not a sign
    ("40 - -5", 40.0),  # a negative upper end is not a range
    # fractions, ordinals, first number wins
    ("3/4", 0.75),
    ("Rank: 3rd", 3.0),
    ("Step 1: offer $200", 1.0),
    ("COVID-19", 19.0),
    ("v2 of 7", 7.0),  # digits glued to letters are not a number
    # words
    ("fifty", 50.0),
    ("Twenty-five thousand dollars", 25000.0),
    ("one hundred and five", 105.0),
    ("a hundred", 100.0),
    ("two million five hundred thousand", 2_500_000.0),
    ("between forty and fifty", 45.0),
    ("twenty fifteen", 20.0),
    ("No one knows, maybe 5", 5.0),
    ("the one with 7 wins", 7.0),
    ("someone said three", 3.0),
    ("I'd say seventy-five", 75.0),
]


@pytest.mark.parametrize("text,expected", NUMBER_CASES)
def test_parse_number(text, expected):
    assert parse_number(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "I cannot answer that.", "N/A", "It depends.", "...", "Anyone", "$", "none"])
def test_parse_number_none_without_a_number(text):
    assert parse_number(text) is None


def test_parse_number_over_long_is_none():
    long = "Well, " + "let me think about this carefully " * 10 + "$500"
    assert parse_number(long) is None
    assert parse_number(long, max_chars=len(long)) == 500.0


def test_parse_number_rejects_non_text():
    with pytest.raises(TypeError, match="str"):
        parse_number(500)


@pytest.mark.parametrize("text,expected", [
    ("Yes", True), ("yes.", True), ("Yeah, probably", True), ("I would say yes", True), ("TRUE", True),
    ("No", False), ("no, I wouldn't", False), ("Nope.", False), ("false", False),
    ("Maybe", None), ("", None), ("Not sure", None), ("Yesterday", None), ("Nobody", None),
])
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) is expected


def test_parse_yes_no_over_long_is_none():
    assert parse_yes_no("x" * 300 + " yes") is None
