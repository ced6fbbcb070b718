from fractions import Fraction

import pytest

from steerscope.metrics.math import equivalent, extract_answer, is_correct, last_boxed, math_reward, to_fraction


def test_last_boxed_takes_last_and_handles_nested_braces():
    assert last_boxed(r"\boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed("no box") is None
    assert last_boxed(r"\boxed{unclosed") is None


@pytest.mark.parametrize("text,ans", [
    ("The answer is 42.", "42"),
    ("3 + 4 = 7, so 7 apples", "7"),
    ("It costs 1,250 dollars", "1,250"),
    ("x = -3.5", "-3.5"),
    ("ratio 7/2", "7/2"),
    (r"so \boxed{12} and later 99", "12"),
    ("nothing here", None),
])
def test_extract_answer(text, ans):
    assert extract_answer(text) == ans


@pytest.mark.parametrize("a,b,eq", [
    ("1,000", "1000", True), ("0.5", "1/2", True), (r"\frac{1}{2}", "0.5", True), (r"\dfrac{3}{4}", ".75", True),
    ("42.0", "42", True), ("$42$", "42", True), ("42.", "42", True), ("-3", "3", False), ("41", "42", False),
    (r"-\frac{1}{2}", "-0.5", True), ("x+1", "x+1", True), ("x+1", "x+2", False), (None, "1", False),
])
def test_equivalent(a, b, eq):
    assert equivalent(a, b) is eq


def test_to_fraction_is_exact():
    assert to_fraction("0.1") == Fraction(1, 10)
    assert to_fraction("abc") is None
    assert to_fraction("1/0") is None


def test_is_correct_and_reward():
    assert is_correct(r"We get \boxed{1,024}.", "1024")
    assert not is_correct("It is 17", "18")
    assert math_reward("q", "= 5", "5") == 1.0 and math_reward("q", "6", "5") == -1.0


# Agreement of math-verify (the study's verifier) with the built-in fallback on the edge cases above
# and on completions of the kind the reasoning study produces.
_AGREE = [
    (r"We get \boxed{1,024}.", "1024", True), ("It is 17", "18", False), ("= 5", "5", True), ("6", "5", False),
    ("The answer is 42.", "42", True), ("3 + 4 = 7, so 7 apples", "7", True), ("It costs 1,250 dollars", "1250", True),
    ("x = -3.5", "-3.5", True), ("ratio 7/2", "7/2", True), (r"so \boxed{12} and later 99", "12", True),
    ("nothing here", "1", False), (r"\boxed{\frac{1}{2}}", "0.5", True), (r"\boxed{\dfrac{3}{4}}", "0.75", True),
    ("42.0", "42", True), ("$42$", "42", True), ("42.", "42", True), ("-3", "3", False), ("41", "42", False),
    (r"\boxed{-\frac{1}{2}}", "-0.5", True), (", 7 + 5 = 12", "12", True), (r"7 + 5 = \boxed{12}", "12", True),
    (r"\boxed{13}", "12", False), ("To solve this problem, we add 7 and", "12", False), ("9 + 3 = 12.\n\n", "12", True),
]


@pytest.mark.parametrize("completion,answer,expected", _AGREE)
def test_math_verify_agrees_with_builtin_verifier(completion, answer, expected):
    from steerscope.metrics.math import is_correct_builtin, is_correct_math_verify

    assert is_correct_math_verify(completion, answer) is expected
    assert is_correct_builtin(completion, answer) is expected


def test_math_verify_survives_a_worker_thread():
    import threading

    from steerscope.metrics.math import is_correct_math_verify

    out = []
    t = threading.Thread(target=lambda: out.append(is_correct_math_verify(r"\boxed{12}", "12")))
    t.start()
    t.join()
    assert out == [True]
