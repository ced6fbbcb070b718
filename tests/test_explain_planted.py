"""The card against mechanisms planted by weight surgery (the cheapest cases of
benchmarks/validate_card.py, on the embedded model): every claim settled by construction must come
out right or undecided, never wrong."""

from __future__ import annotations

import pytest

import steerscope as ss
from steerscope.analyses.planted import cases
from steerscope.data import data_path, read_jsonl
from steerscope.explain.context import Settings
from steerscope.explain.validate import run_case

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def formality(smol):
    pairs = read_jsonl(data_path("traits", "formality.jsonl"))[:32]
    return ss.extract(smol, [p["positive"] for p in pairs], [p["negative"] for p in pairs], method="dim",
                      layers=[smol.n_layers // 3], positions=[-1], show_progress=False)


@pytest.mark.parametrize("name, sections", [("unembed_blind", ("attribution",)), ("no_effect", ())])
def test_a_planted_mechanism_is_never_called_wrong(smol, formality, name, sections) -> None:
    st = Settings.quick()
    case = next(c for c in cases(seeds=st.perp_seeds) if c.name == name)
    res = run_case(smol, formality, case, st, "quick", sections=sections)
    assert set(res.outcomes) == set(case.expected)
    assert "wrong" not in res.outcomes.values() and "missing" not in res.outcomes.values(), res.evidence
    assert "right" in res.outcomes.values(), res.evidence  # measured 2026-12-03: right in both cases
