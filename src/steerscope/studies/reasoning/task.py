"""A generated arithmetic task with verifiable answers, sized for SmolLM2-135M-Instruct on CPU.

Problems are short word problems or expressions whose answer is an integer. ``difficulty``
picks the kind (measured unsteered greedy accuracy of SmolLM2-135M-Instruct, 24 new tokens,
is in docs/reasoning.md). The generator is deterministic given ``seed``; train and test sets use
disjoint problem strings.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from steerscope.errors import StudyError

INSTRUCTION = "Put the final answer within \\boxed{}."
_NAMES = ["Tom", "Anna", "Sam", "Mia", "Leo", "Ella", "Ben", "Zoe"]
_ADD_TEMPLATES = ["What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "What is the sum of {a} and {b}?"]
_ITEMS = ["apples", "books", "coins", "pencils", "stickers", "marbles", "cards", "shells"]


@dataclass(frozen=True)
class Problem:
    """One problem: the question text (without the instruction) and its answer as a string."""

    question: str
    answer: str

    @property
    def prompt(self) -> str:
        return f"{self.question} {INSTRUCTION}"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _one(rng: random.Random, difficulty: str) -> Problem:
    if difficulty == "add":  # two 2-digit numbers
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return Problem(f"What is {a} + {b}?", str(a + b))
    if difficulty == "add-1d":  # two 1-digit numbers, four phrasings (324 distinct problems)
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return Problem(rng.choice(_ADD_TEMPLATES).format(a=a, b=b), str(a + b))
    if difficulty == "add-small":  # a 2-digit and a 1-digit number
        a, b = rng.randint(10, 99), rng.randint(2, 9)
        return Problem(f"What is {a} + {b}?", str(a + b))
    if difficulty == "mul":  # 2-digit times 1-digit
        a, b = rng.randint(11, 99), rng.randint(2, 9)
        return Problem(f"What is {a} * {b}?", str(a * b))
    if difficulty == "two-step":  # a + b - c
        a, b, c = rng.randint(10, 60), rng.randint(10, 60), rng.randint(1, 9)
        return Problem(f"What is {a} + {b} - {c}?", str(a + b - c))
    if difficulty == "word":  # one-step word problem: has a, gets b more, gives c away
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b, c = rng.randint(5, 40), rng.randint(2, 30), rng.randint(1, 9)
        q = (f"{name} has {a} {item}. {name} buys {b} more and then gives away {c}. "
             f"How many {item} does {name} have now?")
        return Problem(q, str(a + b - c))
    raise StudyError(f"unknown difficulty {difficulty!r}; use one of add-1d, add-small, add, mul, two-step, word")


DIFFICULTIES = ("add-1d", "add-small", "add", "mul", "two-step", "word")


def make_problems(n: int, difficulty: str = "two-step", seed: int = 0, exclude: set[str] | None = None) -> list[Problem]:
    """``n`` distinct problems (deterministic for a seed), none of whose questions is in ``exclude``."""
    if n < 0:
        raise StudyError("the number of problems must be non-negative")
    rng = random.Random(f"{difficulty}:{seed}")
    seen = set(exclude or ())
    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        p = _one(rng, difficulty)
        tries += 1
        if tries > 100 * (n + 10):
            raise StudyError(f"cannot draw {n} distinct {difficulty} problems; ask for fewer")
        if p.question in seen:
            continue
        seen.add(p.question)
        out.append(p)
    return out


def split(n_train: int, n_test: int, difficulty: str = "two-step", seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train and test sets."""
    test = make_problems(n_test, difficulty, seed=seed + 1_000_003)
    train = make_problems(n_train, difficulty, seed=seed, exclude={p.question for p in test})
    return train, test
