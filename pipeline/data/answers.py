"""How the answer is read from a response, for the `exact_match` reward and held-out accuracy.

A stage's `answer_extractor:` (`AnswerExtractorSpec`) chooses the rule: a regex, whose first capture group
is the answer; a `package.module:function` from response text to answer text; or by default the
rule of short answers, the first word of the first line (`first_word`).
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Callable

from pipeline.config.paths import import_object

if TYPE_CHECKING:
    from pipeline.config.specs import AnswerExtractorSpec

AnswerCheck = Callable[[str, Any], bool]  # is_correct(response, reference answer)


def first_word(response: str) -> str:
    """The default answer: the first word of the first line, without trailing punctuation.

    A leading "A:" is dropped because pretraining text often shows "Q: ... A: ..." pairs, which a model may echo.
    """
    lines = response.strip().splitlines()
    words = lines[0].removeprefix("A:").split() if lines else []
    return words[0].rstrip(".,;:!?") if words else ""


def same_answer(stated: str, expected: str) -> bool:
    """Equal as written, or as numbers (exactly): `1,080` is `1080`, `$18` is `18`, `72.` (a sentence's end) and `72.0` are `72`."""
    if stated == expected:
        return True
    numbers = [_number(text) for text in (stated, expected)]
    return None not in numbers and numbers[0] == numbers[1]


NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _number(text: str) -> Decimal | None:
    """A written number's exact value (a float would make 9007199254740993 equal 9007199254740992); None for
    anything else, "inf", "nan" and "1_000" included."""
    text = text.removeprefix("$").replace(",", "").rstrip(".")
    return Decimal(text) if NUMBER.fullmatch(text) else None


def reference_answer(answer: Any) -> str:
    """A row's reference answer as text; "" for none (a missing or empty `answer`, a workaround for open-ended data).

    A whole number read as a float prints as the integer: one fractional answer (or a blank CSV cell) makes the
    whole column float, and `72` must not become "72.0", which no response stating 72 would match as written.
    """
    if answer is None or (isinstance(answer, float) and answer != answer):  # None, or a missing value read as NaN
        return ""
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    return str(answer).strip()


def answer_check(extractor: AnswerExtractorSpec | None = None) -> AnswerCheck:
    """`is_correct(response, answer)`: whether the answer read from `response` equals the reference `answer`
    (`reference_answer`); never for a row without one, so a response that says nothing cannot match an empty answer.

    A regex also reads the reference where it matches, so GSM8K's `answer` column (a worked solution ending
    in `#### 72`) is compared by its final `72`; a reference it does not match is compared as written. What a regex
    reads is compared by `same_answer` (numbers by value: GSM8K writes `#### 1,080`, a model may write `1080`).
    """
    if extractor is None:
        check: AnswerCheck = lambda response, expected: first_word(response) == expected
    elif extractor.function is not None:
        extract = import_object(extractor.function)
        check = lambda response, expected: extract(response) == expected
    else:
        pattern = re.compile(extractor.regex)

        def read(text: str) -> str | None:
            found = pattern.search(text)
            return None if found is None else (found.group(1 if pattern.groups else 0) or "").strip()

        def check(response: str, expected: str) -> bool:
            stated, final = read(response), read(expected)
            return stated is not None and same_answer(stated, expected if final is None else final)

    def is_correct(response: str, answer: Any) -> bool:
        expected = reference_answer(answer)
        return bool(expected) and check(response, expected)

    return is_correct
