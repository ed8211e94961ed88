"""Inputs the reproductions write themselves: English paragraphs (a package data file), templated
arithmetic word problems and sentences for synthesised speech. Nothing is downloaded."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from attnscope.errors import AttnscopeError

ENGLISH_FILE = "english.txt"  # attnscope/findings/data/: paragraphs separated by blank lines


@cache
def english_paragraphs() -> tuple[str, ...]:
    """Original English prose (encyclopedic, narrative, news-like), one paragraph per entry."""
    text = files("attnscope.findings").joinpath("data", ENGLISH_FILE).read_text(encoding="utf-8")
    return tuple(p.strip().replace("\n", " ") for p in text.split("\n\n") if p.strip())


def take(items: tuple[str, ...] | list[str], n: int, what: str) -> list[str]:
    """The first ``n`` items; a clear error when fewer exist."""
    if not 1 <= n <= len(items):
        raise AttnscopeError(f"asked for {n} {what}; between 1 and {len(items)} are available")
    return list(items[:n])


@dataclass(frozen=True)
class WordProblem:
    question: str
    answer: int

    @property
    def prompt(self) -> str:
        """What the model is given: a question / answer frame that invites step-by-step work."""
        return f"Question: {self.question}\nAnswer: Let's think step by step."


NAMES = (
    ("Anna", "she"), ("Omar", "he"), ("Lena", "she"), ("Kofi", "he"), ("Mei", "she"),
    ("Tomas", "he"), ("Priya", "she"), ("Jonas", "he"), ("Sara", "she"), ("Diego", "he"),
)  # fmt: skip
ITEMS = ("apples", "stickers", "marbles", "pencils", "stamps", "cookies", "shells", "cards")


def _problem(kind: int, rng: random.Random) -> WordProblem:
    (name, he), (friend, _) = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, b, c = rng.randint(12, 60), rng.randint(3, 25), rng.randint(2, 11)
    if kind == 0:
        c = min(c, a + b)
        q = (
            f"{name} has {a} {item}. {he.capitalize()} buys {b} more and gives {c} to {friend}. "
            f"How many {item} does {name} have now?"
        )
        return WordProblem(q, a + b - c)
    if kind == 1:
        q = (
            f"A baker fills {c} trays with {b} rolls each. {friend} buys {c + 3} rolls. "
            "How many rolls are left?"
        )
        return WordProblem(q, b * c - (c + 3))
    if kind == 2:
        q = f"A train travels at {a} kilometres per hour for {c} hours. How far does it travel?"
        return WordProblem(q, a * c)
    if kind == 3:
        q = f"{name} reads {b} pages every day. How many pages does {he} read in {c} weeks?"
        return WordProblem(q, b * 7 * c)
    if kind == 4:
        q = (
            f"A box holds {c} {item}. {name} has {b * c} {item}. "
            f"How many boxes does {he} need to pack all of them?"
        )
        return WordProblem(q, b)
    if kind == 5:
        q = (
            f"{name} earns {b} dollars per hour and works {c} hours. {he.capitalize()} spends "
            f"{min(a, b * c)} dollars on a jacket. How much money does {he} have left?"
        )
        return WordProblem(q, b * c - min(a, b * c))
    if kind == 6:
        total = a + b
        q = (
            f"There are {total} students in a class. {b} of them walk to school and the rest "
            "take the bus. How many students take the bus?"
        )
        return WordProblem(q, a)
    q = (
        f"A garden has {c} rows of tulips with {b} tulips in each row. {friend} picks {c} tulips. "
        "How many tulips are still in the garden?"
    )
    return WordProblem(q, b * c - c)


N_KINDS = 8


def word_problems(n: int, seed: int = 0) -> list[WordProblem]:
    """``n`` arithmetic word problems cycling through ``N_KINDS`` templates with seeded names and
    numbers (the same list for the same seed)."""
    if n < 1:
        raise AttnscopeError(f"asked for {n} word problems; ask for at least 1")
    rng = random.Random(seed)
    return [_problem(i % N_KINDS, rng) for i in range(n)]


SPEECH_SENTENCES = (
    "please open the window and let the fresh air come in",
    "the train to the coast leaves from platform seven at noon",
    "my sister planted tomatoes and beans in the garden last spring",
    "turn left at the bakery and walk two blocks to the river",
    "the museum is closed on mondays but open late on fridays",
    "a small dog was sleeping under the kitchen table all afternoon",
    "we need three eggs a cup of milk and some flour for the cake",
    "the weather will be cold and windy with rain in the evening",
)
