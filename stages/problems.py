"""Synthetic multi-step integer arithmetic problems of graded difficulty, gold answers.

A problem is a start value and 1..K additions or subtractions of a digit, kept in 0..99.
"""

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

MIN_VALUE = 0
MAX_VALUE = 9
# One question in EVAL_BUCKETS is reserved for evaluation (hash of the question text),
# so training problems and eval problems are disjoint by construction.
EVAL_BUCKETS = 8
# Draws in a row that find no new eval question before a step count counts as used up.
MAX_MISSES = 2000


@dataclass(frozen=True)
class Problem:
    """A start value followed by signed single-digit steps, evaluated left to right."""

    start: int
    deltas: tuple[int, ...]

    @property
    def steps(self) -> int:
        return len(self.deltas)

    @property
    def question(self) -> str:
        return f"Compute {self.start}{terms(self.deltas)}."

    @property
    def values(self) -> tuple[int, ...]:
        """The running value after each step."""
        out, value = [], self.start
        for d in self.deltas:
            value += d
            out.append(value)
        return tuple(out)

    @property
    def answer(self) -> int:
        return self.values[-1]


def terms(deltas: tuple[int, ...]) -> str:
    """The signed terms as written in a question: (7, -3) -> "+7-3"."""
    return "".join(f"{'+' if d > 0 else '-'}{abs(d)}" for d in deltas)


def acc_response(problem: Problem) -> str:
    """The step-by-step response: close the think block after one line per step.

    Each line folds the first term into the running value and copies the remaining
    terms, so a step needs only local arithmetic and a copy, which a tiny model learns.
    """
    lines = [
        f"{value}{terms(problem.deltas[i + 1 :])}\n"
        for i, value in enumerate(problem.values)
    ]
    return "".join(lines) + f"</think>\n\\boxed{{{problem.answer}}}"


def len_response(problem: Problem) -> str:
    """The concise response: close the think block at once and answer."""
    return f"</think>\n\\boxed{{{problem.answer}}}"


def in_eval_split(question: str) -> bool:
    """Whether a question belongs to the held-out evaluation split."""
    digest = hashlib.sha256(question.encode()).digest()
    return digest[0] % EVAL_BUCKETS == 0


def random_problem(rng: random.Random, steps: int) -> Problem:
    """Draw a problem with `steps` steps whose running value stays in 0..99."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    start = rng.randint(MIN_VALUE, MAX_VALUE)
    deltas, value = [], start
    for _ in range(steps):
        allowed = [
            d
            for d in (*range(-9, 0), *range(1, 10))
            if MIN_VALUE <= value + d <= MAX_VALUE
        ]
        d = rng.choice(allowed)
        deltas.append(d)
        value += d
    return Problem(start, tuple(deltas))


def generate(seed: int, n: int, max_steps: int, *, split: str) -> Iterator[Problem]:
    """Yield `n` problems of the split, steps cycling over 1..max_steps.

    Eval problems are distinct; a step count whose eval questions run out (there are
    few one-step questions) drops out of the cycle.

    Args:
        split: "eval" (only questions in the eval split) or "train" (none of them).
    """
    if split not in ("eval", "train"):
        raise ValueError(f"split must be 'eval' or 'train', got {split!r}")
    want_eval = split == "eval"
    rng = random.Random(f"{split}:{seed}")
    seen: set[str] = set()
    cycle = list(range(1, max_steps + 1))
    i = misses = 0
    while i < n:
        if not cycle:
            raise ValueError(f"only {i} distinct eval problems exist, asked for {n}")
        steps = cycle[i % len(cycle)]
        problem = random_problem(rng, steps)
        q = problem.question
        if in_eval_split(q) != want_eval or (want_eval and q in seen):
            misses += 1
            if misses == MAX_MISSES:
                cycle.remove(steps)
                misses = 0
            continue
        seen.add(q)
        i += 1
        misses = 0
        yield problem
