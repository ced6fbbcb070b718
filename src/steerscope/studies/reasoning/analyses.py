"""Analyses of trained reasoning vectors (Sinii et al., 2025, "Small Vectors, Big Effects").

1. Accuracy with a 95% Wilson interval, and the paired difference to the base model.
2. First-token ΔP: mean over prompts of P_steered(v | prompt) - P_base(v | prompt) at the first
   generated position, for the last-layer vector.
3. Per-head q / k / v path patching of the penultimate-layer vector: in the last layer, one head's
   q, k or v is set to its unsteered value; KL(steered ‖ patched) over completion tokens and the
   fraction of the steering effect on the completions' log-prob that the patch removes.
4. Persistence: per-token Δh_t = h_steered - h_base at resid_post of each later layer;
   mean_t cos(Δh_t, mean Δh) and mean_t cos(Δh_t, s).
5. Layer-pair gain: (acc_pair - max single) / (acc_all - max single).
6. Transfer: copy per-layer vectors into another model of the same depth and width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from steerscope.errors import VectorError
from steerscope.hooks import attached
from steerscope.models.load import LM
from steerscope.stats import cluster_bootstrap, mcnemar_exact, mean_ci, wilson
from steerscope.steer import recording, steering
from steerscope.studies.reasoning.records import (
    Changed,
    EvalRecord,
    FirstTokenRecord,
    PatchRow,
    PersistenceRow,
    PrefixRow,
    SampledComparison,
)
from steerscope.vector import Provenance, SteeringVector


def layer_pair_gain(acc_pair: float, acc_a: float, acc_b: float, acc_all: float) -> float:
    """(acc_pair - max single) / (acc_all - max single); NaN when the denominator is 0."""
    best = max(acc_a, acc_b)
    den = acc_all - best
    return (acc_pair - best) / den if den != 0 else float("nan")


def _batch(lm: LM, texts: Sequence[str], completions: Sequence[str]) -> tuple[dict[str, Any], torch.Tensor]:
    """Left-padded teacher-forcing batch and a bool mask of completion tokens [batch pos]."""
    full = [t + c for t, c in zip(texts, completions)]
    enc = lm.tokenize(list(full), padding_side="left")
    lens = [len(lm.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions]
    pos = torch.arange(enc["input_ids"].shape[1])
    T = enc["input_ids"].shape[1]
    mask = torch.stack([pos >= T - n for n in lens]) & enc["attention_mask"].bool().cpu()
    return enc, mask.to(enc["input_ids"].device)


def _completion_stats(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs [batch pos-1 vocab], log-probs of the next tokens [batch pos-1], the matching mask [batch pos-1])."""
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    tok = lp.gather(-1, ids[:, 1:, None])[..., 0]
    return lp, tok, mask[:, 1:]


def first_token_delta(lm: LM, vec: SteeringVector, texts: Sequence[str], k: int = 10) -> FirstTokenRecord:
    """Mean change of next-token probabilities at the first generated position; top k up and down."""
    enc = lm.tokenize(list(texts), padding_side="left")
    with torch.no_grad():
        p0 = torch.softmax(lm.model(**enc).logits[:, -1].float(), -1)
        with steering(lm, vec, 1.0):
            p1 = torch.softmax(lm.model(**enc).logits[:, -1].float(), -1)
    d = (p1 - p0).mean(0)
    up, down = d.topk(k), (-d).topk(k)
    dec = lm.tokenizer.decode
    return FirstTokenRecord([(dec([i]), float(v), float(p0[:, i].mean()), float(p1[:, i].mean()))
                             for v, i in zip(up.values.tolist(), up.indices.tolist())],
                            [(dec([i]), -float(v), float(p0[:, i].mean()), float(p1[:, i].mean()))
                             for v, i in zip(down.values.tolist(), down.indices.tolist())],
                            float(0.5 * (p1 - p0).abs().sum(-1).mean()))


def qkv_patching(lm: LM, vec: SteeringVector, texts: Sequence[str], completions: Sequence[str]) -> list[PatchRow]:
    """Per-head q/k/v path patching of ``vec`` (applied at all positions) in the last layer.

    Returns one record per (which, head) and per (which, "all"): KL(steered ‖ patched) averaged over
    completion tokens, the completions' mean summed log-prob, and the fraction of the steering effect
    on it that the patch removes, (lp_steered - lp_patched) / (lp_steered - lp_base).
    """
    L = lm.n_layers - 1
    enc, full_mask = _batch(lm, texts, completions)
    # only the positions that predict completion tokens: [batch keep vocab] logits instead of [batch pos vocab]
    # (24 six-shot prompts of ~760 tokens: 3.6 GB per float32 logits tensor, and five alive at once ran out of memory)
    keep = full_mask.shape[1] - int(full_mask.any(0).nonzero()[0]) + 1
    ids, mask = enc["input_ids"][:, -keep:], full_mask[:, -keep:]

    def tail_logits() -> torch.Tensor:
        out: torch.Tensor = (lm.model(**enc, logits_to_keep=keep).logits if "logits_to_keep" in lm.forward_params
                             else lm.model(**enc).logits[:, -keep:])
        return out

    sites = [f"blocks.{L}.attn.{w}" for w in "qkv"]
    with torch.no_grad():
        with recording(lm, sites) as base_cache:
            base = tail_logits()
        with steering(lm, vec, 1.0):
            steer = tail_logits()
    _, tok_b, m = _completion_stats(base, ids, mask)
    lp_s, tok_s, _ = _completion_stats(steer, ids, mask)
    del base, steer
    mf = m.float()
    lpb, lps = float((tok_b * mf).sum(1).mean()), float((tok_s * mf).sum(1).mean())
    out: list[PatchRow] = []
    for w in "qkv":
        clean = base_cache[f"blocks.{L}.attn.{w}"]
        n = clean.shape[2]
        for h in [*range(n), "all"]:
            def fn(x: torch.Tensor, _c: object, h: int | str = h, clean: torch.Tensor = clean) -> torch.Tensor:
                y = x.clone()
                if isinstance(h, str):  # "all"
                    return clean.to(x.dtype)
                y[:, :, h] = clean[:, :, h]
                return y

            with torch.no_grad(), steering(lm, vec, 1.0), attached(lm, {f"blocks.{L}.attn.{w}": fn}):
                pl = tail_logits()
            lp_p, tok_p, _ = _completion_stats(pl, ids, mask)
            kl = (lp_s.exp() * (lp_s - lp_p)).sum(-1)
            lpp = float((tok_p * mf).sum(1).mean())
            eff = (lps - lpp) / (lps - lpb) if abs(lps - lpb) > 1e-9 else float("nan")
            out.append(PatchRow(w, h, float((kl * mf).sum() / mf.sum()), lpp, eff, lpb, lps))
    return out


def persistence(lm: LM, vec: SteeringVector, layer: int, texts: Sequence[str], completions: Sequence[str]
                ) -> list[PersistenceRow]:
    """Per later layer m ≥ layer: mean_t cos(Δh_t, mean Δh) and mean_t cos(Δh_t, s) at resid_post m."""
    enc, _ = _batch(lm, texts, completions)
    real = enc["attention_mask"].bool()
    sites = [f"blocks.{m}.resid_post" for m in range(layer, lm.n_layers)]
    one = vec.select([layer])
    with torch.no_grad():
        with recording(lm, sites) as c0:
            lm.model(**enc)
        with recording(lm, sites) as c1, steering(lm, one, 1.0):
            lm.model(**enc)
    s = one[layer].to(lm.device)
    out = []
    for m, site in zip(range(layer, lm.n_layers), sites):
        dh = (c1[site] - c0[site]).float()[real]  # [tokens d_model]
        mean = dh.mean(0)
        cm = torch.nn.functional.cosine_similarity(dh, mean[None], dim=-1)
        cs = torch.nn.functional.cosine_similarity(dh, s[None].float(), dim=-1)
        out.append(PersistenceRow(m, float(cm.mean()), float(cs.mean()), float(dh.norm(dim=-1).mean())))
    return out


def transfer_vector(vec: SteeringVector, target: LM) -> SteeringVector:
    """The same per-layer directions for ``target``, which must have the same depth and width."""
    src_layers, src_d = vec.provenance.n_layers, vec.d_model
    if src_d != target.d_model:
        raise VectorError(f"cannot transfer a vector of size {src_d} to a model with d_model {target.d_model}; "
                          "transfer needs a model of the same width")
    if src_layers is not None and src_layers != target.n_layers:
        raise VectorError(f"cannot transfer from a {src_layers}-layer model to a {target.n_layers}-layer one; "
                          "transfer needs a model of the same depth")
    prov = Provenance.for_model(target, method="transfer", args={"source_model": vec.provenance.model,
                                                                  "source_fingerprint": vec.provenance.fingerprint})
    return SteeringVector(dict(vec.directions), vec.site, prov)


def per_problem(sampled: Sequence[int], n: int) -> list[float]:
    """Per-problem mean accuracy over its samples, from outcomes stored sample-major (``sampled[r * n + i]``)."""
    if n == 0 or not sampled:
        return []
    if len(sampled) % n:
        raise VectorError(f"{len(sampled)} sampled outcomes are not a whole number of samples of {n} problems")
    k = len(sampled) // n
    return [sum(sampled[r * n + i] for r in range(k)) / k for i in range(n)]


def sampled_comparison(base: EvalRecord, ev: EvalRecord, n_boot: int = 2000, seed: int = 0) -> SampledComparison | None:
    """Paired comparison of pass@1 (per-problem mean over the samples) of ``ev`` against ``base``.

    Returns the mean difference with a paired percentile bootstrap interval over problems (resampling
    problems, each with its two per-problem means), and the two-sided Wilcoxon signed-rank p-value of the
    per-problem differences (zero differences dropped, scipy's default "wilcox"; 1.0 when all are zero).
    None when either has no samples or they cover different problems.
    """
    import numpy as np
    from scipy.stats import wilcoxon

    a, b = per_problem(base.sampled, base.n), per_problem(ev.sampled, ev.n)
    if not a or not b or len(a) != len(b):
        return None
    d = np.asarray(b) - np.asarray(a)
    lo, hi = cluster_bootstrap(lambda idx: float(d[idx].mean()), len(d), n_boot, seed=seed)
    p = float(wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
    return SampledComparison((float(d.mean()), lo, hi), p, len(d), int((d > 0).sum()), int((d < 0).sum()))


def changed_answers(before: Sequence[int], after: Sequence[int]) -> Changed:
    """Paired 0/1 outcomes: wrong→right and right→wrong counts, the net change and the exact McNemar p."""
    up = sum(1 for a, b in zip(before, after) if a == 0 and b == 1)
    down = sum(1 for a, b in zip(before, after) if a == 1 and b == 0)
    return Changed(up, down, up - down, len(before), mcnemar_exact(up, down))


def prefix_summary(token: str, layer: int, base: EvalRecord, vec: EvalRecord, prefix: EvalRecord) -> PrefixRow:
    """The prefix control of the layer-``layer`` vector: its own top lens ``token`` written at the start of
    the response (no steering) against that same vector's gain, with changed answers in both directions.

    ``ratio`` = gain of the prefix / gain of the vector (greedy; NaN when the vector's gain is 0).
    """
    gv = vec.greedy_acc - base.greedy_acc
    gp = prefix.greedy_acc - base.greedy_acc
    return PrefixRow(token, layer, gv, gp, gp / gv if gv else float("nan"), changed_answers(base.greedy, vec.greedy),
                     changed_answers(base.greedy, prefix.greedy), changed_answers(vec.greedy, prefix.greedy),
                     sampled_comparison(base, prefix))


@dataclass
class EvalResult:
    """Accuracy of one condition on the test set.

    ``sampled`` holds ``k`` samples per problem, sample-major; pass@1 is their mean, and its interval a
    cluster bootstrap over problems (each problem with its k samples).
    """

    name: str
    greedy: list[int]
    sampled: list[int]
    examples: list[str]
    k: int = 1

    def summary(self) -> EvalRecord:
        g, s, n = self.greedy, self.sampled, len(self.greedy)
        pp = per_problem(s, n)
        ci = mean_ci(pp, seed=0)[1:] if pp else None
        return EvalRecord(self.name, sum(g) / max(1, n), wilson(sum(g), n), sum(s) / len(s) if s else None, ci,
                          "cluster bootstrap over problems" if pp else None, n, self.k if s else 0, len(s), g, s,
                          self.examples[:6])
