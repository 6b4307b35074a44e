"""How the answer is read from a response, for the `exact_match` reward and held-out accuracy.

A stage's `answer_extractor:` (`AnswerExtractorSpec`) chooses the rule: a regex, whose first capture group
is the answer; a `package.module:function` from response text to answer text; or by default the
rule of short answers, the first word of the first line (`first_word`).
"""

from __future__ import annotations

import re
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
    """Equal as written, or as numbers: `1,080` is `1080`, `$18` is `18`, `72.` (a sentence's end) and `72.0` are `72`."""
    if stated == expected:
        return True
    numbers = [_number(text) for text in (stated, expected)]
    return None not in numbers and numbers[0] == numbers[1]


def _number(text: str) -> float | None:
    try:
        return float(text.removeprefix("$").replace(",", "").rstrip("."))
    except ValueError:
        return None


def answer_check(extractor: AnswerExtractorSpec | None = None) -> AnswerCheck:
    """`is_correct(response, answer)`: whether the answer read from `response` equals the reference `answer`.

    A regex also reads the reference where it matches, so GSM8K's `answer` column (a worked solution ending
    in `#### 72`) is compared by its final `72`; a reference it does not match is compared as written. What a regex
    reads is compared by `same_answer` (numbers by value: GSM8K writes `#### 1,080`, a model may write `1080`).
    """
    if extractor is None:
        return lambda response, answer: first_word(response) == str(answer)
    if extractor.function is not None:
        extract = import_object(extractor.function)
        return lambda response, answer: extract(response) == str(answer)
    pattern = re.compile(extractor.regex)

    def read(text: str) -> str | None:
        found = pattern.search(text)
        return None if found is None else (found.group(1 if pattern.groups else 0) or "").strip()

    def is_correct(response: str, answer: Any) -> bool:
        stated, expected = read(response), read(str(answer))
        return stated is not None and same_answer(stated, str(answer).strip() if expected is None else expected)

    return is_correct
