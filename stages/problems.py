"""Synthetic arithmetic for the embedded default: chains of k single-digit + and - whose
running value stays in 0..9, a fixed train/eval split by question hash, and the two
response styles (step by step for `acc`, direct for `len`)."""

import hashlib
import random
from dataclasses import dataclass

OPS = ("+", "-")
MAX_STEPS = 6
SUFFIX = " ="
END_THINK = "</think>"
# Why not modulo 10: measured, a 64-wide model left the result of a mod-10 step at
# chance (0.1) after 600 steps while copying perfectly; a result that stays in 0..9
# correlates with each operand and is learned.
# A question is held out for evaluation when its sha256 falls in this share of the
# space; training draws only from the rest, so the two sets can never meet.
EVAL_BUCKETS = 2
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b}


@dataclass(frozen=True)
class Problem:
    """One chain: `digits[0] ops[0] digits[1] ...`, evaluated left to right."""

    digits: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def steps(self) -> int:
        return len(self.ops)

    @property
    def question(self) -> str:
        text = str(self.digits[0])
        for op, d in zip(self.ops, self.digits[1:], strict=True):
            text += f"{op}{d}"
        return text + SUFFIX

    def running(self) -> list[int]:
        """The value after each step."""
        values, v = [], self.digits[0]
        for op, d in zip(self.ops, self.digits[1:], strict=True):
            v = APPLY[op](v, d)
            values.append(v)
        return values

    @property
    def answer(self) -> str:
        return str(self.running()[-1])


def is_eval(question: str) -> bool:
    """True for the questions reserved for the eval set (a fixed share by hash)."""
    digest = hashlib.sha256(question.encode()).digest()
    return int.from_bytes(digest[:8], "big") % EVAL_BUCKETS == 0


def random_problem(rng: random.Random, steps: int) -> Problem:
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be in [1, {MAX_STEPS}], got {steps}")
    v = rng.randrange(10)
    digits, ops = [v], []
    for _ in range(steps):
        op = rng.choice(OPS)
        d = rng.randint(0, 9 - v) if op == "+" else rng.randint(0, v)
        v = APPLY[op](v, d)
        digits.append(d)
        ops.append(op)
    return Problem(tuple(digits), tuple(ops))


def draw(rng: random.Random, steps: int, *, held_out: bool) -> Problem:
    """A random problem of `steps` steps from the eval share or the training share."""
    while True:
        p = random_problem(rng, steps)
        if is_eval(p.question) == held_out:
            return p


def eval_set(seed: int, per_steps: int) -> list[Problem]:
    """`per_steps` distinct held-out problems for each k in 1..MAX_STEPS, in k order."""
    rng, out = random.Random(f"eval-{seed}"), []
    for k in range(1, MAX_STEPS + 1):
        seen: set[str] = set()
        while len(seen) < per_steps:
            p = draw(rng, k, held_out=True)
            if p.question not in seen:
                seen.add(p.question)
                out.append(p)
    return out


def steps_response(p: Problem) -> str:
    """The `acc` style: one line per step with the running value, then the answer."""
    lines, prev = [], p.digits[0]
    for op, d, v in zip(p.ops, p.digits[1:], p.running(), strict=True):
        lines.append(f"{prev}{op}{d}={v}\n")
        prev = v
    return "".join(lines) + direct_response(p)


def direct_response(p: Problem) -> str:
    """The `len` style: close the think block at once and answer."""
    return f"{END_THINK}\n\n\\boxed{{{p.answer}}}"
