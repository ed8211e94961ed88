"""Two-step arithmetic word problems with their answers, generated deterministically: the inputs of
the rhythm reproduction on instruct reasoning traces and the verifiable task of the RL benchmark.

Each problem chains two operations on small numbers (results stay positive integers); ``steps``
holds the two equations that reach the answer. ``final_number`` reads a model's answer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from attnscope.errors import AttnscopeError
from attnscope.findings.texts import ITEMS, NAMES, WordProblem

N_KINDS = 6


@dataclass(frozen=True)
class TwoStepProblem(WordProblem):
    steps: tuple[str, str] = ("", "")  # the two equations, e.g. ("12 + 7 = 19", "19 - 4 = 15")


def _problem(kind: int, rng: random.Random, max_start: int) -> TwoStepProblem:
    (name, he), (friend, _) = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, b, c = rng.randint(5, max(5, max_start)), rng.randint(2, 9), rng.randint(2, 9)
    he_ = he.capitalize()
    if kind == 0:  # a + b - c
        q = (
            f"{name} has {a} {item}. {he_} buys {b} more and then gives {c} to {friend}. "
            f"How many {item} does {name} have now?"
        )
        return TwoStepProblem(
            q, a + b - c, (f"{a} + {b} = {a + b}", f"{a + b} - {c} = {a + b - c}")
        )
    if kind == 1:  # b * c - d
        d = rng.randint(1, b * c - 1)
        q = (
            f"{name} buys {b} bags with {c} {item} in each bag. {he_} gives {d} {item} to "
            f"{friend}. How many {item} does {name} have left?"
        )
        return TwoStepProblem(
            q, b * c - d, (f"{b} * {c} = {b * c}", f"{b * c} - {d} = {b * c - d}")
        )
    if kind == 2:  # a - b - c
        a = b + c + rng.randint(1, max(1, max_start - b - c))
        q = (
            f"A shop has {a} {item}. It sells {b} in the morning and {c} in the afternoon. "
            f"How many {item} does the shop have left?"
        )
        return TwoStepProblem(
            q, a - b - c, (f"{a} - {b} = {a - b}", f"{a - b} - {c} = {a - b - c}")
        )
    if kind == 3:  # b + b * c
        q = (
            f"{name} has {b} {item}. {friend} has {c} times as many {item} as {name}. "
            f"How many {item} do they have together?"
        )
        return TwoStepProblem(
            q, b + b * c, (f"{b} * {c} = {b * c}", f"{b} + {b * c} = {b + b * c}")
        )
    if kind == 4:  # b * c + a
        q = (
            f"{name} earns {b} dollars every day for {c} days. {he_} already had {a} dollars. "
            f"How many dollars does {name} have now?"
        )
        return TwoStepProblem(
            q, b * c + a, (f"{b} * {c} = {b * c}", f"{b * c} + {a} = {b * c + a}")
        )
    # kind 5: (x + d) / c with an exact quotient k: x = c * k - d, at least 2
    k = rng.randint(2, 9)
    d = rng.randint(1, c * k - 2)
    q = (
        f"{name} has {c * k - d} {item} and finds {d} more. {he_} shares them equally among "
        f"{c} friends. How many {item} does each friend get?"
    )
    return TwoStepProblem(q, k, (f"{c * k - d} + {d} = {c * k}", f"{c * k} / {c} = {k}"))


def two_step_problems(
    n: int, seed: int = 0, *, kinds: Sequence[int] = range(N_KINDS), max_start: int = 30
) -> list[TwoStepProblem]:
    """``n`` two-step problems cycling through the templates ``kinds`` (0: a + b - c, 1: b * c - d,
    2: a - b - c, 3: b + b * c, 4: b * c + a, 5: (x + d) / c), seeded names and numbers (the same
    list for the same arguments); ``max_start`` bounds the starting amount ``a`` (at least 5;
    template 2's stock: at most ``max(max_start, b + c + 1)``); the other operands are 2-9."""
    if n < 1:
        raise AttnscopeError(f"asked for {n} word problems; ask for at least 1")
    if not kinds or not set(kinds) <= set(range(N_KINDS)):
        raise AttnscopeError(f"kinds must be template numbers 0-{N_KINDS - 1}, got {list(kinds)}")
    rng = random.Random(seed)
    return [_problem(kinds[i % len(kinds)], rng, max_start) for i in range(n)]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The last number written in ``text`` (``1,200`` -> 1200.0), None when there is none."""
    found = numbers(text)
    return found[-1] if found else None


def numbers(text: str) -> list[float]:
    """Every number written in ``text``, in order (``1,200`` -> 1200.0)."""
    return [float(n.replace(",", "")) for n in _NUMBER.findall(text)]


def correct(problem: WordProblem, completion: str) -> bool:
    """Whether the last number of ``completion`` is the problem's answer."""
    return final_number(completion) == problem.answer
