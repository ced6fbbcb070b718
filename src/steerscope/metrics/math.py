"""Verifying final answers of math problems: extraction and numeric equivalence.

Algorithm:
    1. Extraction: the content of the last ``\\boxed{...}`` (balanced braces) if there is one;
       otherwise the last number in the text (integers, decimals, ``1,234``, ``-3``, ``7/2``),
       after an optional "answer is" / "=" cue.
    2. Normalisation: strip ``$``, spaces, thousands separators and a trailing period; turn
       ``\\frac{a}{b}`` / ``\\dfrac{a}{b}`` / ``a/b`` into an exact fraction.
    3. Equivalence: both sides parse as exact :class:`fractions.Fraction` values and are equal
       (so ``0.5 == 1/2 == \\frac{1}{2}`` and ``1,000 == 1000.0``); otherwise the normalised
       strings are compared.

:func:`is_correct` and :func:`math_reward` use Hugging Face's ``math-verify`` (as Sinii et al., 2025
do for the ±1 reward): ``parse`` extracts the final answer (``\\boxed{}`` first, then the last
number or LaTeX expression) and ``verify`` compares with sympy. The dependency-free verifier above
(:func:`is_correct_builtin`) is the fallback when ``math_verify`` is not importable; the two agree
on the arithmetic answers the study produces (tests/test_math_verify.py).
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from typing import Any

_NUM = r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+"
_NUM_RE = re.compile(_NUM)
_FRAC_RE = re.compile(r"\\d?frac\{([^{}]+)\}\{([^{}]+)\}")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed), or None."""
    i = text.rfind("\\boxed")
    if i < 0:
        return None
    j = text.find("{", i)
    if j < 0:
        return None
    depth, k = 0, j
    while k < len(text):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1 : k]
        k += 1
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in a completion: last non-empty ``\\boxed{}`` content, else the last number.

    Example:
        >>> extract_answer("so the answer is \\\\boxed{\\\\frac{3}{4}}")
        '\\\\frac{3}{4}'
        >>> extract_answer("12 + 30 = 42.")
        '42'
    """
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    nums = _NUM_RE.findall(text)
    return nums[-1].replace(" ", "") if nums else None


def normalize(ans: str) -> str:
    """Strip ``$``, spaces, ``\\!``, thousands commas, a trailing period and ``\\text{..}`` units."""
    s = ans.strip().strip("$").replace("\\!", "").replace("\\,", "").replace(" ", "")
    s = re.sub(r"\\text\{[^{}]*\}", "", s)
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def to_fraction(ans: str) -> Fraction | None:
    """An exact value for a numeric answer (``"1,234"``, ``"0.25"``, ``"7/2"``, ``"\\frac{7}{2}"``), or None."""
    s = normalize(ans)
    m = _FRAC_RE.fullmatch(s.lstrip("-"))
    sign = -1 if s.startswith("-") else 1
    try:
        if m:
            return sign * Fraction(normalize(m.group(1))) / Fraction(normalize(m.group(2)))
        if re.fullmatch(r"-?\d+(\.\d+)?/-?\d+(\.\d+)?", s):
            a, b = s.split("/")
            return Fraction(a) / Fraction(b)
        if re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def equivalent(a: str | None, b: str | None) -> bool:
    """True when two answers are the same number (exactly) or the same normalised string."""
    if a is None or b is None:
        return False
    fa, fb = to_fraction(a), to_fraction(b)
    if fa is not None and fb is not None:
        return fa == fb
    return normalize(a) == normalize(b) and normalize(a) != ""


def is_correct_builtin(completion: str, answer: str) -> bool:
    """The dependency-free verifier: the extracted final answer equals ``answer`` (exactly, as numbers)."""
    return equivalent(extract_answer(completion), str(answer))


def _math_verify() -> Any:
    try:
        import math_verify
    except ImportError:  # pragma: no cover - math-verify is a declared dependency
        return None
    return math_verify


def is_correct_math_verify(completion: str, answer: str) -> bool:
    """``math_verify.verify(parse(answer), parse(completion))``; False when either side does not parse.

    Its signal-based timeouts only work in the main thread, so they are off elsewhere.

    Example:
        >>> is_correct_math_verify("7 + 5 = \\boxed{12}", "12")
        True
    """
    mv = _math_verify()
    if mv is None:
        raise ImportError("math-verify is not installed: pip install math-verify")
    main = threading.current_thread() is threading.main_thread()
    t = 5 if main else None
    try:
        gold = mv.parse(str(answer), parsing_timeout=t)
        pred = mv.parse(completion, parsing_timeout=t)
        return bool(gold and pred and mv.verify(gold, pred, timeout_seconds=t))
    except Exception:  # a verifier must never crash training; unparsable = wrong
        return False


def is_correct(completion: str, answer: str) -> bool:
    """Whether the final answer of ``completion`` equals ``answer``: math-verify, else the built-in verifier."""
    if _math_verify() is None:  # pragma: no cover
        return is_correct_builtin(completion, answer)
    return is_correct_math_verify(completion, answer)


def math_reward(prompt: str, completion: str, answer: str) -> float:
    """The ±1 reward of Sinii et al. (2025): +1 if the final answer is correct, else -1."""
    return 1.0 if is_correct(completion, answer) else -1.0
