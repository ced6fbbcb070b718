"""``steerscope explain`` end to end on tiny models: a GGUF-imported vector, a second family, a
family with unsupported sections, the HTML card in headless Chromium, one-line errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch

import steerscope as ss
from conftest import make_tiny
from steerscope.cli import main
from steerscope.control_vectors import write_control_vector
from steerscope.explain import KEYS, explain
from test_refusal_mechanisms_fixtures import PROMPTS, one_thread, smol_tokenizer, tiny_lm  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, one_thread):
    lm = tiny_lm(layers=3)
    d = tmp_path_factory.mktemp("tiny-llama")
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    return d, lm


def test_cli_explains_a_gguf_imported_vector_and_prints_the_card_json(model_dir, tmp_path, capsys) -> None:
    folder, lm = model_dir
    g = torch.Generator().manual_seed(3)
    made = ss.SteeringVector({2: 3.0 * torch.randn(lm.d_model, generator=g)})  # hand-made, no provenance
    # as llama.cpp or repeng write it: no steerscope.* keys (export_gguf's would restore the provenance)
    gguf = write_control_vector(tmp_path / "control.gguf", {"direction.1": made[2].numpy()}, "tiny")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:3]))
    out = tmp_path / "card"
    rc = main(["explain", str(gguf), "--model", str(folder), "--prompts", str(prompts), "--alpha", "1.0",
               "--quick", "--out", str(out), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert tuple(printed) == KEYS
    assert printed == json.loads((out / "card.json").read_text())
    assert printed["vector"]["layers"] == [2] and printed["vector"]["provenance"]["method"] == "gguf-import"
    assert printed["unsupported"] == {} and (out / "card.html").is_file()


def test_cli_errors_are_one_line_with_exit_code_2(model_dir, tmp_path, capsys) -> None:
    folder, _ = model_dir
    for argv in (["explain", "no-such-vector", "--model", str(folder), "--out", str(tmp_path)],
                 ["explain", "smollm2-135m-safe/refusal-dim", "--model", str(folder), "--out", str(tmp_path)]):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()  # (model loading may print a progress bar first)
        assert lines[-1].startswith("error: ") and sum(ln.startswith("error:") for ln in lines) == 1


def test_explain_help_documents_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    text = capsys.readouterr().out
    for opt in ("--model", "--prompts", "--alpha", "--scorer", "--quick", "--out", "--json", "--layer", "--force"):
        assert re.search(rf"{opt}\b[^\n]*\n?\s+\S", text), opt


def _card(family: str) -> dict:
    lm = make_tiny(family, tokenizer=smol_tokenizer())
    g = torch.Generator().manual_seed(1)
    vec = ss.SteeringVector({1: 4.0 * torch.randn(lm.d_model, generator=g)})
    return explain(lm, vec, PROMPTS[:3], alpha=1.0, quick=True, show_progress=False).to_dict()


@pytest.fixture(scope="module")
def qwen_card(one_thread):
    return _card("qwen2")


@pytest.fixture(scope="module")
def gemma_card(one_thread):
    return _card("gemma2")


@pytest.fixture(scope="module")
def unsupported_card(one_thread):
    """A card whose EAP-IG raises for the model family, as it did for Gemma before the circuits package."""
    from steerscope import circuits as C
    from steerscope.errors import UnsupportedModelError

    def refuse(*_a, **_k):
        raise UnsupportedModelError("EAP-IG does not support this family (test)")
    mp = pytest.MonkeyPatch()
    mp.setattr(C, "eap_ig", refuse)
    try:
        return _card("llama")
    finally:
        mp.undo()


@pytest.mark.parametrize("which", ["qwen_card", "gemma_card"])
def test_other_families_fill_every_section(which, request) -> None:
    card = request.getfixturevalue(which)
    assert card["unsupported"] == {}
    assert all(card[k] is not None for k in KEYS)
    assert 0 < card["circuit"]["edge_fraction"] <= 1
    assert card["frozen"]["ov"]["effect_retained"] is not None


def test_unsupported_sections_are_listed_with_a_reason_and_the_rest_runs(unsupported_card) -> None:
    card = unsupported_card
    un = card["unsupported"]
    assert un["attribution"] == "EAP-IG does not support this family (test)"
    assert "attribution section" in un["circuit"] and "attribution section" in un["sparsity"]
    assert set(un) == {"attribution", "circuit", "sparsity"}
    for k in KEYS:
        assert (card[k] is not None) != (k in un), k  # each section filled or explained
    assert card["lens"]["top_positive"]["raw"] and card["identifiability"]["null_fraction"] is not None
    assert "Not computed for this model" in card["verdict"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
@pytest.mark.parametrize("which", ["gemma_card", "unsupported_card"])
def test_html_card_renders_every_section_in_headless_chromium(which, request, tmp_path) -> None:
    from steerscope.explain.html import write_card

    card = request.getfixturevalue(which)
    path = write_card(card, tmp_path / "card.html")
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--dump-dom", path.resolve().as_uri()], capture_output=True, text=True, timeout=120).stdout
    for key in KEYS:  # (the claims section comes first; every key has its section)
        m = re.search(rf'<section id="{key}" data-section="{key}"><h2>{key}</h2>(.*?)</section>', dom, re.S)
        assert m is not None, key
        body = m.group(1)
        assert re.search(r"<(table|p|figure)\b", body), key
        assert ('class="unsupported"' in body) == (key in card["unsupported"]), key
    plotted = ("dose", "attribution", "frozen", "circuit", "sparsity")  # a figure each where the section is present
    assert dom.count("<img src=\"data:image/png;base64,") == sum(card[k] is not None for k in plotted)


def test_explain_without_alpha_warns_once_when_the_effect_is_not_distinguishable(model_dir, tmp_path, capsys) -> None:
    folder, lm = model_dir
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "v.safetensors"
    ss.SteeringVector({1: 2.0 * torch.randn(lm.d_model, generator=g)}).save(path)  # a random, generic direction
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "card"
    assert main(["explain", str(path), "--model", str(folder), "--prompts", str(prompts), "--quick",
                 "--sections", "lens", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    card = json.loads((out / "card.json").read_text())
    alpha = card["dose"]["chosen_alpha"]
    assert card["dose"]["alpha_given"] is False and card["dose"]["chosen_reason"]
    effect = next(c for c in card["claims"] if c["rule"] == "dose.effect")
    assert effect["status"] != "supported"
    warnings = [ln for ln in captured.err.splitlines() if ln.startswith("warning: at alpha")]
    assert warnings == [f"warning: at alpha {alpha:.3g} the effect is not distinguishable from a random direction's "
                        f"({effect['status']}: {effect['evidence']}); the mechanism claims below describe a weak or "
                        "generic effect"]
    assert f"The card uses alpha {alpha:.3g} ({card['dose']['chosen_reason']})" in captured.out
    html = (out / "card.html").read_text()
    assert f"steered (alpha {alpha:.3g})" in html and "unsteered" in html
