"""Study presets (qwen-cpu, paper-a-gemma2, paper-a-llama3) resolve, and device / dtype reach the loader.

The GPU presets were never run here (no GPU, no hub); these tests cover their CPU-checkable parts.
"""

from __future__ import annotations

import pytest
import torch

from steerscope.cli import build_parser
from steerscope.models.load import _resolve_device, _resolve_dtype
from steerscope.studies.refusal import steps as rs
from steerscope.studies.refusal.config import PRESETS, RefusalConfig
from steerscope.studies.refusal_mechanisms.config import PRESETS as MPRESETS
from steerscope.studies.refusal_mechanisms.config import Config


def _refusal(*argv: str) -> RefusalConfig:
    return RefusalConfig.from_args(build_parser().parse_args(["study", "refusal", *argv]))


def _mech(*argv: str) -> Config:
    return Config.from_args(build_parser().parse_args(["study", "refusal-mechanisms", *argv]))


def test_no_preset_is_the_default_configuration():
    assert _refusal() == RefusalConfig()
    assert _mech() == Config()


@pytest.mark.parametrize("name", ["paper-a-gemma2", "paper-a-llama3", "qwen-cpu"])
def test_presets_resolve_and_explicit_options_override_them(name):
    cfg = _refusal("--preset", name)
    for k, v in PRESETS[name].items():
        assert getattr(cfg, k) == v, k
    assert _refusal("--preset", name, "--n-test", "7").n_test == 7
    m = _mech("--preset", name)
    for k, v in MPRESETS[name].items():
        assert getattr(m, k) == v, k
    assert _mech("--preset", name, "--n-eval", "5").n_eval == 5


def test_paper_a_presets_are_the_papers_settings():
    g, ll = PRESETS["paper-a-gemma2"], PRESETS["paper-a-llama3"]
    assert g["model"] == "google/gemma-2-2b-it" and ll["model"] == "meta-llama/Llama-3.2-3B-Instruct"
    for p in (g, ll):  # 128 train / 32 val per side, every layer, alpha +-1, 100 test, bf16
        assert (p["n_train"], p["n_val"], p["n_test"], p["layer_stride"], p["alphas"]) == (128, 32, 100, 1, (1.0,))
        assert p["dtype"] == "bfloat16" and p["trained_lr"] == 0.01 and p["trained_epochs"] == 10
    assert MPRESETS["paper-a-gemma2"]["n_ablate"] == 100 and MPRESETS["paper-a-gemma2"]["steps"] == 10


@pytest.mark.parametrize("name", ["paper-a-gemma2", "paper-a-llama3", "qwen-cpu"])
def test_mechanisms_presets_leave_attribution_prompts_and_a_64_prompt_table_1(name):
    """On the shipped 100-prompt test split each preset keeps n_attr attribution prompts after its
    evaluation prompts, and Table 1 (the ablations) runs on at least 64 prompts per setting."""
    from steerscope.studies.refusal_mechanisms import steps as St

    m = _mech("--preset", name)
    for setting in St.SETTINGS:
        assert len(St.attr_prompts(m, setting)) == m.n_attr
        assert len(St.ablation_prompts(m, setting)) >= 64


def test_dtype_and_device_reach_the_loader(monkeypatch):
    seen = {}

    def fake_load(name, device=None, dtype=None, **kw):
        seen.update(name=name, device=device, dtype=dtype)
        raise RuntimeError("stop")

    monkeypatch.setattr(rs, "load_model", fake_load)
    cfg = _refusal("--preset", "paper-a-llama3")
    with pytest.raises(RuntimeError, match="stop"):
        rs.load_study_model(cfg, None, device="cuda")  # type: ignore[arg-type]
    assert seen == {"name": "meta-llama/Llama-3.2-3B-Instruct", "device": "cuda", "dtype": "bfloat16"}
    assert _resolve_dtype(cfg.dtype) is torch.bfloat16
    if not torch.cuda.is_available():  # on this CPU machine the cuda path fails with a fix-it message
        from steerscope.errors import ModelLoadError

        with pytest.raises(ModelLoadError, match="--device cpu"):
            _resolve_device("cuda")


def test_qwen_preset_scores_an_alpha_grid_and_the_matched_norm_rows():
    cfg = _refusal("--preset", "qwen-cpu")
    assert cfg.model == "qwen2.5-coder-0.5b" and 1.0 not in cfg.select_alphas and cfg.matched_norm
    assert _mech("--preset", "qwen-cpu").vectors["dim"] == "qwen2.5-coder-0.5b/refusal-dim"


def test_matched_norm_rows_rescale_ntp_po_to_the_dim_norm(monkeypatch):
    from steerscope.vector import SteeringVector

    seen = []

    def fake_generate(lm, prompts, vector=None, alpha=1.0, **kw):
        seen.append((float(vector[vector.layers[0]].norm()), alpha))
        return ["I'm sorry" if alpha > 0 else "Sure"] * len(prompts)

    monkeypatch.setattr(rs, "generate", fake_generate)
    g = torch.Generator().manual_seed(0)
    vecs = {"DIM": SteeringVector({3: torch.randn(8, generator=g) * 5}),
            "NTP": SteeringVector({3: torch.randn(8, generator=g) * 40}),
            "PO": SteeringVector({3: torch.randn(8, generator=g)})}
    rec = rs.evaluate_matched_step(None, RefusalConfig(n_test=3), vecs)  # type: ignore[arg-type]
    ref = float(vecs["DIM"][3].norm())
    assert rec.reference_norm == pytest.approx(ref)
    assert [r.method for r in rec.steered] == ["NTP@|DIM|", "PO@|DIM|"]
    assert all(n == pytest.approx(ref, rel=1e-5) for n, _ in seen) and len(seen) == 4
    assert sorted(a for _, a in seen) == [-1.0, -1.0, 1.0, 1.0]
    assert all(r.harmful_asr == 1.0 and r.harmless_refusal == 1.0 for r in rec.steered)


def test_shipped_qwen_vectors_record_their_scale():
    from steerscope.vector import SteeringVector, shipped_vectors

    names = [n for n in shipped_vectors() if n.startswith("qwen2.5-coder-0.5b/")]
    assert "qwen2.5-coder-0.5b/refusal-dim" in names
    for name in names:
        v = SteeringVector.load(name)
        assert v.d_model == 896 and v.provenance.n_layers == 24 and "scale" in v.provenance.args
    dim = SteeringVector.load("qwen2.5-coder-0.5b/refusal-dim")
    a = dim.provenance.args
    assert float(dim[dim.layers[0]].norm()) == pytest.approx(a["scale"] * a["norm_unscaled"], rel=1e-4)
    for name, path in MPRESETS["qwen-cpu"]["vectors"].items():  # the preset only names shipped vectors
        assert path in names, name
