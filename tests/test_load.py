"""models.load: adapters applied through the public apply_adapter; the LM re-export."""

from __future__ import annotations

import pytest
import torch

from conftest import batch_ids, make_tiny


def test_lm_is_re_exported_from_load():
    from steerscope.models import LM as A
    from steerscope.models.lm import LM as B
    from steerscope.models.load import LM as C

    assert A is B is C


def test_apply_adapter_merges_a_lora_and_matches_the_unmerged_peft_model(tmp_path):
    peft = pytest.importorskip("peft")
    from steerscope.models import apply_adapter

    lm = make_tiny("llama", seed=5)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                          init_lora_weights=False)
    wrapped = peft.get_peft_model(make_tiny("llama", seed=5).model, cfg)
    wrapped.save_pretrained(str(tmp_path))
    batch = batch_ids()
    with torch.no_grad():
        want = wrapped(**batch).logits  # PEFT's own unmerged forward
        base = lm.model(**batch).logits
    out = apply_adapter(lm, tmp_path)
    assert out is lm
    with torch.no_grad():
        got = lm.model(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - base).abs().max() > 1e-3  # the adapter changed the model


def test_apply_adapter_without_weights_is_a_model_load_error(tmp_path):
    from steerscope.errors import ModelLoadError
    from steerscope.models import apply_adapter

    with pytest.raises(ModelLoadError, match="adapter_model.safetensors"):
        apply_adapter(make_tiny("llama"), tmp_path)
