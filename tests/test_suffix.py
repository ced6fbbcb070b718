"""Running blocks l.. from a recorded prefix reproduces the model's own forward, in every family."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILY_NAMES, batch_ids, make_tiny
from steerscope.circuits._suffix import logit_diff, prefix, run_blocks
from steerscope.generation import position_ids


def _inputs(n: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    batch = batch_ids(n, length, left_pad=3)
    batch["position_ids"] = position_ids(batch["attention_mask"])
    return batch


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_blocks_from_the_prefix_reproduce_the_final_stream_with_rows_reordered(family: str) -> None:
    lm = make_tiny(family)
    inputs = _inputs()  # left padding; 12 positions > the sliding window (8) of gemma2/3
    pre = prefix(lm, inputs, layer=1)
    rows = torch.tensor([2, 0, 1, 0])
    with torch.no_grad():
        h, out_rows = run_blocks(lm, pre, pre.resid[rows], rows)
    assert torch.equal(out_rows, rows)
    real = inputs["attention_mask"][rows].bool()
    assert torch.allclose(h[real], pre.final[rows][real], atol=1e-4)


def test_rows_inserted_at_a_later_block_start_there(tiny_llama) -> None:
    lm = tiny_llama
    inputs = _inputs()
    streams = {}
    from steerscope.hooks import attached

    with attached(lm, {"blocks.3.resid_pre": lambda x, _c: streams.__setitem__(3, x)}):
        pre = prefix(lm, inputs, layer=1)
    with torch.no_grad():
        h, rows = run_blocks(lm, pre, pre.resid[:1], torch.tensor([0]),
                             inserts={3: (streams[3][[2, 1]], torch.tensor([2, 1]))})
    assert rows.tolist() == [0, 2, 1]
    assert torch.allclose(h, pre.final[[0, 2, 1]], atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_logit_diff_equals_the_metric_from_full_logits(family: str) -> None:
    lm = make_tiny(family)
    inputs = _inputs()
    g = torch.Generator().manual_seed(1)
    y_pos, y_neg = (torch.randint(0, 1000, (3, 12), generator=g) for _ in range(2))
    mask = (torch.rand(3, 12, generator=g) < 0.5) & inputs["attention_mask"].bool()
    with torch.no_grad():
        logits = lm.model(**inputs).logits
    ref = ((logits.gather(-1, y_pos[..., None]) - logits.gather(-1, y_neg[..., None]))[..., 0] * mask).sum(-1)
    pre = prefix(lm, inputs, layer=2)
    with torch.no_grad():
        m = logit_diff(lm, pre.final, torch.arange(3), y_pos, y_neg, mask)
    assert torch.allclose(m, ref, atol=1e-4, rtol=1e-5)


def test_a_prefix_before_its_layer_cannot_run(tiny_llama) -> None:
    pre = prefix(tiny_llama, _inputs(), layer=2)
    with pytest.raises(ValueError):
        run_blocks(tiny_llama, pre, pre.resid, torch.arange(3), start=1)
