"""The graph-safe steering sites of ``steerscope_vllm_plugin`` under torch.compile, without vLLM.

A toy decoder with vLLM's layer signature ``(positions, hidden, residual) -> (hidden, residual)``
is given the plugin's buffers and pre-hooks, compiled once, and then steered only by writing the
buffers (as the worker extension does each step). The compiled outputs must equal an eager
computation of the same steering (independent: plain tensor code, no hooks), so the buffer reads
are in the traced graph and later writes are seen without retracing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src" / "steerscope" / "backends" / "engine"))
import steerscope_vllm_plugin as plugin

D, LAYERS = 16, 3


class Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = torch.nn.Linear(D, D)
        self.mlp = torch.nn.Linear(D, D)

    def forward(self, positions, hidden, residual):
        residual = hidden if residual is None else hidden + residual
        hidden = self.mlp(torch.tanh(self.self_attn(residual)))
        return hidden, residual


class Inner(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer() for _ in range(LAYERS))

    def forward(self, positions, hidden):
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        return hidden + residual


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = Inner()


def reference(toy: Toy, x: torch.Tensor, delta: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
    """delta [layers tokens d] added to resid_pre; r [tokens d] unit rows projected out (0 rows: none)."""
    def proj(t):
        return t if r is None else t - (t * r).sum(-1, keepdim=True) * r

    with torch.no_grad():
        resid = None
        hidden = x
        for i, layer in enumerate(toy.model.layers):
            pre = (hidden if resid is None else hidden + resid) + delta[i]
            pre = proj(pre)
            a = proj(layer.self_attn(pre))
            hidden = proj(layer.mlp(torch.tanh(a)))
            resid = pre
        return hidden + resid


@pytest.mark.parametrize("ablate", [False, True])
def test_buffers_written_after_compilation_steer_the_compiled_model(ablate):
    torch.manual_seed(0)
    toy = Toy().eval()
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_batched_tokens=32, max_num_seqs=4),
                          model_config=SimpleNamespace(get_hidden_size=lambda: D, dtype=torch.float32))
    sites = plugin.add_sites(toy, cfg, ablate)
    compiled = torch.compile(toy.model, backend="aot_eager", dynamic=True, fullgraph=True)
    x = torch.randn(7, D)
    pos = torch.arange(7)
    with torch.no_grad():
        first = compiled(pos, x)  # traced now, with every buffer zero
    zero = torch.zeros(LAYERS, 7, D)
    torch.testing.assert_close(first, reference(toy, x, zero, None), rtol=0, atol=0)
    # two requests: tokens 0-3 request 0 (rows 1 prompt / 2 generated), tokens 4-6 request 1 unsteered
    rows = torch.tensor([1, 1, 2, 2, 0, 0, 0])
    table = torch.randn(LAYERS, sites.rows, D)
    table[:, 0] = 0
    sites.table.copy_(table)
    sites.idx.zero_()
    sites.idx[:7] = rows
    r = None
    if ablate:
        rt = torch.randn(sites.rows, D)
        rt = rt / rt.norm(dim=-1, keepdim=True)
        rt[0] = 0
        sites.rtable.copy_(rt)
        r = rt[rows]
    with torch.no_grad():
        steered = compiled(pos, x)
    expect = reference(toy, x, table[:, rows], r)
    torch.testing.assert_close(steered, expect, rtol=1e-5, atol=1e-5)
    assert (steered - first).abs().max() > 1e-2  # the write changed the compiled output
    torch.testing.assert_close(steered[4:], first[4:], rtol=0, atol=0)  # the unsteered request is untouched
