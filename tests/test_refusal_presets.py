"""Study presets (qwen-cpu, paper-a-gemma2, paper-a-llama3) resolve, and device / dtype reach the loader.

The GPU presets were never run here (no GPU, no hub); these tests cover their CPU-checkable parts.
"""

from __future__ import annotations

import pytest
import torch

from steerscope.cli import build_parser
from steerscope.models.load import _resolve_device, _resolve_dtype
from steerscope.studies.refusal import cli as rc
from steerscope.studies.refusal import steps as rs
from steerscope.studies.refusal.config import PRESETS, RefusalConfig
from steerscope.studies.refusal_mechanisms import cli as mc
from steerscope.studies.refusal_mechanisms.config import PRESETS as MPRESETS
from steerscope.studies.refusal_mechanisms.config import Config


def _refusal(*argv: str) -> RefusalConfig:
    return rc.config_from_args(build_parser().parse_args(["study", "refusal", *argv]))


def _mech(*argv: str) -> Config:
    return mc.config_from(build_parser().parse_args(["study", "refusal-mechanisms", *argv]))


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
    assert MPRESETS["paper-a-gemma2"]["n_eval"] == 100 and MPRESETS["paper-a-gemma2"]["steps"] == 10


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
