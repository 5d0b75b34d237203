"""Reading a numeric (or yes/no) answer out of a model's free-text reply.

``parse_number`` returns the first number the reply states, as a float:
- currency marks are ignored: ``$``, ``US$``, ``USD``, ``EUR``, ``GBP``, ``€``, ``£``;
- ``,`` is a thousands separator only in groups of three digits (``40,000``; ``1,5`` reads as 1);
- multipliers after a number: ``k``/``K``, ``hundred``, ``thousand``, ``million``/``mn``/``M``,
  ``billion``/``bn``/``B`` (the one-letter ``M``/``B`` only when written right after the digits);
- percentages are returned as written: ``"75%"`` and ``"75 percent"`` give 75.0, not 0.75, because
  the audit's chance questions ask for a number from 0 to 100;
- a range gives its midpoint: ``"$40,000-$50,000"``, ``"40 to 50"``, ``"between 40 and 50"``;
  a multiplier written only on the upper end also scales the lower end when that keeps the
  range increasing (``"40-50k"`` is 40,000 to 50,000);
- a leading minus written against the number is a sign (``-5``, ``-$5``, ``$-5``); a dash with a
  space after it (a bullet) is not;
- a simple fraction of integers gives its value (``3/4`` is 0.75);
- number words: ``"fifty"``, ``"twenty-five thousand"``, ``"one hundred and five"``, ``"a hundred"``
  (a lone ``one`` after a determiner, as in ``"no one"`` or ``"the one"``, is not a number).
It returns None when the reply states no number or is longer than ``max_chars`` (the papers drop
over-long answers). Only the first number counts: ``"On a scale of 1 to 10, 7"`` reads as the
range 1-10. Ordinals read as their number (``"3rd"`` is 3).
"""
from __future__ import annotations

import re

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
}
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
         "ninety": 90}
_SCALES = {"thousand": 1e3, "million": 1e6, "billion": 1e9}
_MULTIPLIERS = {"k": 1e3, "hundred": 1e2, "thousand": 1e3, "thousands": 1e3, "million": 1e6, "mn": 1e6,
                "m": 1e6, "billion": 1e9, "bn": 1e9, "b": 1e9}
_DETERMINERS = {"no", "the", "this", "that", "which", "each", "every", "any", "another", "some"}

_CURRENCY = r"(?:US\$|\$|USD|EUR|GBP|€|£)"
_DIGIT_NUMBER = re.compile(
    r"(?<![\w.])"
    rf"(?P<neg>[-−])?(?:{_CURRENCY}\s?)?(?P<neg2>[-−])?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:/(?P<den>\d+)(?![\d.]))?"
    r"(?:\s?(?P<mult>(?i:k|hundred|thousands?|million|mn|billion|bn))(?![A-Za-z])|(?P<short>[MB])(?![A-Za-z]))?"
    r"(?:\s?(?:%|(?i:percent|per cent)(?![A-Za-z])))?"
)
_WORD = "|".join(sorted([*_UNITS, *_TENS, "hundred", *_SCALES], key=len, reverse=True))
_WORD_NUMBER = re.compile(
    rf"(?<![\w-])(?:a\s+(?=(?:hundred|thousand|million|billion)\b))?(?:{_WORD})(?:(?:\s+and\s+|\s+|-)(?:{_WORD}))*"
    r"(?![\w])",
    re.IGNORECASE,
)
_RANGE_LINK = re.compile(r"\s*(?:-|–|—|\bto\b|\band\b)\s*", re.IGNORECASE)
_YES_NO = re.compile(r"\b(yes|yeah|yep|yup|true|no|nope|false)\b", re.IGNORECASE)


def _words_value(phrase: str) -> tuple[float, int] | None:
    """Value of the longest valid number-word prefix of ``phrase`` and that prefix's length."""
    total, current, last, end = 0.0, 0.0, None, 0
    for match in re.finditer(r"[A-Za-z]+", phrase):
        word = match.group().lower()
        if word == "a" and last is None:
            current, last = 1.0, "unit"
            continue
        if word == "and":
            if last not in ("hundred", "scale"):
                break
            continue
        if word in _UNITS:
            if last in ("unit", "teen") or (last == "tens" and _UNITS[word] >= 10):
                break
            current += _UNITS[word]
            last = "unit" if _UNITS[word] < 10 else "teen"
        elif word in _TENS:
            if last in ("unit", "teen", "tens"):
                break
            current += _TENS[word]
            last = "tens"
        elif word == "hundred":
            if last == "hundred":
                break
            current = (current or 1.0) * 100
            last = "hundred"
        else:
            if last == "scale":
                break
            total += (current or 1.0) * _SCALES[word]
            current, last = 0.0, "scale"
        end = match.end()
    return (total + current, end) if end else None


class _Number:
    def __init__(self, value: float, start: int, end: int, scale: float, bare: float):
        self.value, self.start, self.end, self.scale, self.bare = value, start, end, scale, bare


def _digit_number(match: re.Match) -> _Number:
    value = float(match["num"].replace(",", ""))
    if match["den"] is not None and float(match["den"]) != 0 and "." not in match["num"]:
        value /= float(match["den"])
    multiplier = match["mult"] or match["short"]
    scale = _MULTIPLIERS[multiplier.lower()] if multiplier else 1.0
    sign = -1.0 if (match["neg"] or match["neg2"]) else 1.0
    return _Number(sign * value * scale, match.start(), match.end(), scale, value)


def _word_number(text: str, match: re.Match) -> _Number | None:
    parsed = _words_value(match.group())
    if parsed is None:
        return None
    value, length = parsed
    if match.group()[:length].lower() == "one":
        before = re.findall(r"[A-Za-z]+", text[: match.start()])
        if before and before[-1].lower() in _DETERMINERS:
            return None
    return _Number(value, match.start(), match.start() + length, 1.0, value)


def _number_at(text: str, pos: int, *, anchored: bool) -> _Number | None:
    """The first number at or after ``pos`` (exactly at ``pos`` when ``anchored``)."""
    if anchored:
        digit = _DIGIT_NUMBER.match(text, pos)
        if digit:
            return _digit_number(digit)
        word = _WORD_NUMBER.match(text, pos)
        return _word_number(text, word) if word else None
    digit = _DIGIT_NUMBER.search(text, pos)
    word = None
    for candidate in _WORD_NUMBER.finditer(text, pos, digit.start() if digit else len(text)):
        word = _word_number(text, candidate)
        if word is not None:
            return word
    return _digit_number(digit) if digit else None


def parse_number(text: str, *, max_chars: int = 200) -> float | None:
    """The first number stated in ``text`` (a range gives its midpoint); None if none or too long."""
    if not isinstance(text, str):
        raise TypeError(f"parse_number expects the reply as a str, got {type(text).__name__}")
    if len(text) > max_chars:
        return None
    first = _number_at(text, 0, anchored=False)
    if first is None:
        return None
    link = _RANGE_LINK.match(text, first.end)
    if link is None:
        return first.value
    if link.group().strip().lower() == "and" and not re.search(
        rf"\bbetween\s*(?:{_CURRENCY}\s?)?$", text[: first.start], re.IGNORECASE
    ):
        return first.value
    second = _number_at(text, link.end(), anchored=True)
    if second is None or second.value < 0:
        return first.value
    low = first.value
    if first.scale == 1.0 and second.scale != 1.0 and first.bare < second.bare:
        low *= second.scale
    return (low + second.value) / 2


def parse_yes_no(text: str, *, max_chars: int = 200) -> bool | None:
    """True/False from the first yes-like or no-like word (yes, yeah, yep, true / no, nope, false).

    None when the reply has neither or is longer than ``max_chars``.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_yes_no expects the reply as a str, got {type(text).__name__}")
    if len(text) > max_chars:
        return None
    match = _YES_NO.search(text)
    if match is None:
        return None
    return match.group(1).lower() in ("yes", "yeah", "yep", "yup", "true")


__all__ = ["parse_number", "parse_yes_no"]
