"""Exact-match scoring of generated answers to the arithmetic word problems.

The responses of `lora_jax.experiments.data.arithmetic` end in
``"The answer is N."`` and each row carries the integer ``answer``.
`extract_answer` reads the integer a generation commits to, `math_exact_match`
compares it with the reference, and `math_accuracy` averages over a set.

The rule (`extract_answer`): the number after the *last* ``"The answer is"``
(case-insensitive) if some occurrence is followed by one, otherwise the last
number anywhere in the text. Numbers may carry a sign (``-12``, ``−12``) and
thousands separators (``1,234``); a trailing period ends the sentence, not a
decimal. A number with a non-zero fractional part (``3.5``) is not an integer
and gives ``None``; ``12.0`` counts as 12.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = ["extract_answer", "math_accuracy", "math_exact_match"]

# A sign only where it cannot be a binary minus ("5-3" is 5 and 3); commas only in groups of three.
_NUMBER = r"(?<![\w.])([-−]?)(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?!\d)"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_RE = re.compile(r"the\s+answer\s+is[\s:=*$]*" + _NUMBER, re.IGNORECASE)


def _to_int(match: re.Match[str]) -> int | None:
    sign, digits, fraction = match.group(1), match.group(2), match.group(3)
    if fraction is not None and fraction.strip("0"):
        return None
    value = int(digits.replace(",", ""))
    return -value if sign else value


def extract_answer(text: str) -> int | None:
    """The integer a generated solution gives as its answer, or None.

    Takes the number after the last ``"The answer is"`` (case-insensitive;
    spaces, ``:``, ``=``, ``$`` and Markdown ``**`` may come between) that is
    followed by a number; without one, the last number in the text. Commas between groups
    of three digits are thousands separators (``"1,234"`` is 1234), a leading
    ``-`` or ``−`` makes it negative unless it follows a digit or letter
    (``"5-3"`` reads as 5 and 3), digits glued to a preceding letter are part
    of a name (``"v2"`` has no number), and a fractional part must be zero.

    Args:
        text: The generated response.

    Returns:
        The integer, or ``None`` if the text has no number or the chosen one
        is not an integer.

    Raises:
        TypeError: If ``text`` is not a string.

    >>> extract_answer("12 * 3 = 36. The answer is 36.")
    36
    >>> extract_answer("She has 1,234 left, so the answer is -1,234")
    -1234
    >>> extract_answer("I think it is 7 or maybe 8")
    8
    >>> extract_answer("No idea.") is None
    True
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a string, got {type(text).__name__}.")
    answers = list(_ANSWER_RE.finditer(text))
    if answers:
        return _to_int(answers[-1])
    numbers = list(_NUMBER_RE.finditer(text))
    return _to_int(numbers[-1]) if numbers else None


def _check_answer(answer: Any) -> int:
    if isinstance(answer, bool) or not hasattr(answer, "__index__"):
        raise TypeError(f"`answer` must be an integer, got {answer!r} ({type(answer).__name__}).")
    return int(answer)


def math_exact_match(generated: str, answer: int) -> bool:
    """Whether a generation's extracted answer equals the reference integer.

    Args:
        generated: The generated response.
        answer: The reference answer (a Python or NumPy integer).

    Returns:
        True if `extract_answer` finds exactly ``answer``.

    Raises:
        TypeError: If ``generated`` is not a string or ``answer`` not an integer.

    >>> math_exact_match("7 + 5 = 12. The answer is 12.", 12)
    True
    >>> math_exact_match("The answer is 13.", 12)
    False
    """
    answer = _check_answer(answer)
    return extract_answer(generated) == answer


def math_accuracy(generations: Iterable[str], answers: Iterable[int]) -> float:
    """The fraction of generations whose answer matches exactly.

    Args:
        generations: Generated responses.
        answers: The reference integers, in the same order (e.g. the
            ``answer`` column of `lora_jax.experiments.data.arithmetic`).

    Returns:
        Accuracy in ``[0, 1]``.

    Raises:
        ValueError: If the two have different lengths or are empty.
        TypeError: As `math_exact_match`.

    >>> math_accuracy(["The answer is 4.", "The answer is 5."], [4, 6])
    0.5
    """
    generations, answers = list(generations), list(answers)
    if len(generations) != len(answers):
        raise ValueError(
            f"`generations` and `answers` must have the same length, got {len(generations)} and {len(answers)}."
        )
    if not generations:
        raise ValueError("`generations` is empty; there is nothing to score.")
    return sum(math_exact_match(g, a) for g, a in zip(generations, answers)) / len(generations)
