"""A generated arithmetic task with verifiable answers, sized for SmolLM2-135M-Instruct on CPU.

Problems are short word problems or expressions whose answer is an integer. ``difficulty``
picks the kind (measured unsteered greedy accuracy of SmolLM2-135M-Instruct is in docs/reasoning.md);
``multi-2-add-tiny``, ``multi-2-tiny``, ``multi-2-add``, ``multi-2-small``, ``multi-2`` and ``multi-3`` are
multi-step word problems (:func:`multi_step`), graded like every task by math-verify (``metrics/math.py``).
The generator is deterministic given ``seed``; train and test sets use disjoint problem strings.
"""

from __future__ import annotations

import random
import re
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
    if difficulty in MULTI_STEP:
        return multi_step(rng, *MULTI_STEP[difficulty])
    raise StudyError(f"unknown difficulty {difficulty!r}; use one of {', '.join(DIFFICULTIES)}")


_GAIN = ["finds {n} more", "buys {n} more", "gets {n} more from a friend", "is given {n} more"]
_LOSE = ["gives {n} away", "loses {n}", "sells {n}", "uses {n}"]

MULTI_STEP: dict[str, tuple[int, int, bool]] = {
    "multi-2-add-tiny": (2, 3, False), "multi-2-tiny": (2, 3, True), "multi-2-add": (2, 5, False),
    "multi-2-small": (2, 5, True), "multi-2": (2, 9, True), "multi-3": (3, 9, True)}
"""Multi-step word problems: name -> (operations after the start amount, largest operand, losses allowed)."""


def multi_step(rng: random.Random, n_ops: int, top: int, losses: bool = True) -> Problem:
    """A word problem with a start amount and ``n_ops`` gains or losses (operands 1..``top``, start 2..``top``).

    Every intermediate amount stays >= 0, so each sentence is possible; the answer is the final amount.
    With ``losses=False`` every step is a gain (additions only).
    Phrasings (names, items, verbs) are drawn from small lists, so thousands of distinct problems exist.
    """
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    amount = rng.randint(2, top)
    parts = [f"{name} has {amount} {item}."]
    for i in range(n_ops):
        n = rng.randint(1, top)
        if losses and amount - n >= 0 and rng.random() < 0.5:
            amount -= n
            verb = rng.choice(_LOSE)
        else:
            amount += n
            verb = rng.choice(_GAIN)
        parts.append(("Then " if i else "") + f"{name} {verb.format(n=n)}.")
    parts.append(f"How many {item} does {name} have now?")
    return Problem(" ".join(parts), str(amount))


DIFFICULTIES = ("add-1d", "add-small", "add", "mul", "two-step", "word", *MULTI_STEP)


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


_LOSS_VERBS = tuple(v.split()[0] for v in _LOSE)  # gives, loses, sells, uses (also "gives away" in "word")
_STEP = re.compile(r"^(?:Then )?(\w+) (.*?)(\d+)(.*)$")


def worked(problem: Problem) -> str:
    """A worked solution of a generated problem, ending in ``\\boxed{answer}``: the assistant turn of a few-shot example.

    Multi-step word problems get one line per step (``Tom buys 2 more: 3 + 2 = 5.``); the others one line with the
    arithmetic where the question states it. The solution is checked against the problem's answer.

    Example:
        >>> worked(Problem("Tom has 3 coins. Tom loses 1. Then Tom finds 2 more. How many coins does Tom have now?", "4"))
        'Tom starts with 3 coins.\\nTom loses 1: 3 - 1 = 2.\\nThen Tom finds 2 more: 2 + 2 = 4.\\nThe answer is \\\\boxed{4}.'
    """
    sents = [s.strip() for s in problem.question.replace(" and then ", ". Then ").split(". ")]
    start = re.match(r"^(\w+) has (\d+) (\w+)$", sents[0])
    if start and sents[-1].startswith("How many") and all(_STEP.match(s.rstrip(".")) for s in sents[1:-1]):
        amount = int(start.group(2))
        lines = [f"{start.group(1)} starts with {amount} {start.group(3)}."]
        for s in sents[1:-1]:
            s = s.rstrip(".")
            n = int(_STEP.match(s).group(3))  # type: ignore[union-attr]
            lose = any(f" {w} " in f" {s} " for w in _LOSS_VERBS)
            new = amount - n if lose else amount + n
            lines.append(f"{s}: {amount} {'-' if lose else '+'} {n} = {new}.")
            amount = new
        body, result = "\n".join(lines), str(amount)
    else:
        expr = re.search(r"(\d+(?: [-+*] \d+)+)", problem.question)
        body, result = (f"{expr.group(1)} = {problem.answer}." if expr else ""), problem.answer
    if result != problem.answer:
        raise StudyError(f"cannot work out {problem.question!r}: got {result}, expected {problem.answer}")
    return (body + "\n" if body else "") + f"The answer is \\boxed{{{problem.answer}}}."


def examples(n: int, difficulty: str, seed: int = 0, exclude: set[str] | None = None) -> list[tuple[str, str]]:
    """``n`` few-shot turns (prompt, :func:`worked` solution) of ``difficulty``, drawn with their own seed and
    disjoint from ``exclude`` (pass the train and test questions)."""
    return [(p.prompt, worked(p)) for p in make_problems(n, difficulty, seed=seed + 2_000_003, exclude=exclude)]
