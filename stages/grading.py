"""Grade a reasoning model's response: the answer is the last balanced `\\boxed{}` after
the one `</think>`, judged equal to the gold answer by math-verify.
"""

import logging
import re
from dataclasses import dataclass
from functools import lru_cache

from math_verify import parse, verify

log = logging.getLogger(__name__)

END_THINK = "</think>"
BOXED = "\\boxed{"
# Two plain integers are equal exactly when math-verify says so (test_grading checks
# it); deciding them without its LaTeX parser, ~2 ms a call, keeps grading off the
# sweep's time (320 samples x 11 points on the embedded default).
INTEGER = re.compile(r"-?[0-9]+")


class GradingError(ValueError):
    """A gold answer that math-verify cannot read; the eval data needs fixing."""


class EvalDataError(ValueError):
    """An eval jsonl the task cannot use (defined here: lm-eval loads the task module
    by path, so a class defined there would not be the one callers catch)."""


@dataclass(frozen=True)
class Verdict:
    """One graded response; `reason` says why it is unformatted or incorrect."""

    formatted: bool
    extracted: str | None
    correct: bool
    reason: str


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the `}` closing the group opened just before `start`, or None.

    `\\{` and `\\}` are LaTeX literals, not grouping, so they do not count.
    """
    depth, i = 1, start
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def boxed_answers(text: str) -> list[str]:
    """Contents of every balanced top-level `\\boxed{...}` in `text`, in order.

    A box whose braces never close is skipped, so a box inside it can still count.
    """
    found, i = [], text.find(BOXED)
    while i != -1:
        start = i + len(BOXED)
        end = _closing_brace(text, start)
        if end is None:
            i = text.find(BOXED, start)
            continue
        found.append(text[start:end].strip())
        i = text.find(BOXED, end + 1)
    return found


def extract_answer(response: str) -> tuple[str | None, bool, str]:
    """(answer, formatted, reason) of a response that opens inside `<think>`.

    The answer is the last non-empty box after the last `</think>`; formatted means
    exactly one `</think>` and such a box after it. A response without `</think>` was
    cut off (or never stopped) while thinking: it has no answer, whatever it boxed.
    """
    n_end = response.count(END_THINK)
    if n_end == 0:
        return None, False, "no </think>: cut off while thinking"
    boxes = [b for b in boxed_answers(response.rsplit(END_THINK, 1)[1]) if b]
    if not boxes:
        return None, False, "no \\boxed{} after </think>"
    if n_end > 1:
        return boxes[-1], False, f"{n_end} </think> tags"
    return boxes[-1], True, "formatted"


@lru_cache(maxsize=4096)
def parse_gold(gold: str) -> tuple:
    """math-verify's parse of a gold answer (bare LaTeX, e.g. `\\frac{1}{2}`)."""
    parsed = parse(f"${gold}$")
    if not parsed:
        raise GradingError(
            f"gold answer {gold!r} cannot be parsed by math-verify; write it as "
            "bare LaTeX or a number"
        )
    return tuple(parsed)


def check_gold(gold: str) -> None:
    """Raise GradingError now, not mid-sweep, for a gold math-verify cannot read."""
    if not INTEGER.fullmatch(gold):
        parse_gold(gold)


@lru_cache(maxsize=65536)
def is_equivalent(answer: str, gold: str) -> bool:
    """math-verify equivalence of an extracted answer with the gold one."""
    if INTEGER.fullmatch(answer) and INTEGER.fullmatch(gold):
        return int(answer) == int(gold)
    pred = parse(f"{BOXED}{answer}}}")
    return bool(pred) and verify(list(parse_gold(gold)), pred)


@lru_cache(maxsize=65536)
def grade(response: str, gold: str) -> Verdict:
    """Format, extracted answer and correctness of one response against `gold`."""
    answer, formatted, reason = extract_answer(response)
    if answer is None:
        return Verdict(formatted=False, extracted=None, correct=False, reason=reason)
    correct = is_equivalent(answer, gold)
    if formatted and not correct:
        reason = "not equivalent to the gold answer"
    return Verdict(
        formatted=formatted, extracted=answer, correct=correct, reason=reason
    )
