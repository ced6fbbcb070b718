"""SAE and DiffSAE features of the task's generations at the penultimate-layer vector's layer.

1. Generations: each train prompt gets ``sae_samples`` sampled completions (T = 1) unsteered and
   ``sae_samples`` steered with the layer-l vector; each is labelled correct or not (math-verify).
2. Activations: teacher-forced prompt + completion. SAE: ``blocks.l.resid_post`` under the
   condition that generated the text. DiffSAE (Sinii et al. 2025): h_steered - h_unsteered on the
   same text at ``blocks.(l+1).resid_post`` (at l itself the difference is exactly s on every token,
   since the vector is added after layer l's MLP). The first token of each sequence is left out.
3. Generations are split in half by prompt (seeded); the SAEs are trained on the first half's tokens;
   FVE and L0 are measured on the held-out half's tokens.
4. Correctness: per generation, the mean code of each feature over the completion tokens; features
   are ranked by |AUROC - ½| on the training half and their AUROC reported on the held-out half.
   Permutation baseline: the same selection and held-out evaluation with shuffled labels (200 times).
5. Alignment: max_j |cos(W_dec[j], s)| against the same maximum for 200 random Gaussian directions.
6. Max-activating tokens (with 8 tokens of context) of the top correctness and alignment features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steerscope.analyses.sae import SAEConfig, TopKSAE, auroc, sae_metrics, train_sae
from steerscope.metrics.math import is_correct
from steerscope.models.load import LM
from steerscope.steer import recording, steering
from steerscope.studies.reasoning import analyses as an
from steerscope.studies.reasoning import steps as st
from steerscope.studies.reasoning.config import ReasoningConfig
from steerscope.studies.reasoning.records import (
    Alignment,
    Correctness,
    Generation,
    MaxActivating,
    MaxToken,
    SaeExample,
    SaeFit,
    SaeRecord,
)
from steerscope.vector import SteeringVector

N_PERM = 200


def generations(lm: LM, cfg: ReasoningConfig, vec: SteeringVector) -> list[Generation]:
    """Sampled completions of the train prompts, unsteered and steered, with correctness labels."""
    train, _ = st.problems(cfg)
    texts = st.chat_texts(lm, cfg, train)
    out: list[Generation] = []
    for cond in ("base", "steered"):
        steer = None if cond == "base" else vec
        for r in range(cfg.sae_samples):
            seed = cfg.seed + 31337 * (r + 1) + (cond == "steered")
            comps = st._generate(lm, texts, steer, cfg.max_new_tokens, True, seed, backend=cfg.backend)
            out += [Generation(i, t, c if c else " ", cond == "steered", int(is_correct(c, p.answer)))
                    for i, (t, c, p) in enumerate(zip(texts, comps, train))]
    return out


@dataclass(frozen=True)
class Activations:
    """Token rows of the SAE (``x``) and DiffSAE (``diff``) inputs with each row's generation index, position in
    it, completion flag and token id; ``diff_layer`` is where the differences are read."""

    x: torch.Tensor
    diff: torch.Tensor
    gen: torch.Tensor
    completion: torch.Tensor
    ids: torch.Tensor
    pos: torch.Tensor
    diff_layer: int


def activations(lm: LM, gens: list[Generation], vec: SteeringVector, layer: int, batch: int = 50) -> Activations:
    """Token rows of the SAE and DiffSAE inputs with their generation index, position and completion flag."""
    dl = min(layer + 1, lm.n_layers - 1)
    sa, sd = f"blocks.{layer}.resid_post", f"blocks.{dl}.resid_post"
    xs, ds, gi, comp, ids, pos = [], [], [], [], [], []
    for s in range(0, len(gens), batch):
        chunk = gens[s : s + batch]
        enc, mask = an._batch(lm, [g.text for g in chunk], [g.completion for g in chunk])
        with torch.no_grad():
            with recording(lm, [sa, sd]) as c0:
                lm.model(**enc)
            with recording(lm, [sa, sd]) as c1, steering(lm, vec, 1.0):
                lm.model(**enc)
        real = enc["attention_mask"].bool().clone()
        first = real.float().argmax(1)
        real[torch.arange(real.shape[0]), first] = False
        steered = torch.tensor([g.steered for g in chunk], device=real.device)[:, None, None]
        x = torch.where(steered, c1[sa], c0[sa]).float()
        xs.append(x[real].cpu())
        ds.append((c1[sd] - c0[sd]).float()[real].cpu())
        b, t = real.nonzero(as_tuple=True)
        gi.append(b.cpu() + s)
        pos.append(t.cpu())
        comp.append(mask[real].cpu())
        ids.append(enc["input_ids"][real].cpu())
    return Activations(torch.cat(xs), torch.cat(ds), torch.cat(gi), torch.cat(comp), torch.cat(ids), torch.cat(pos), dl)


def per_generation(sae: TopKSAE, x: torch.Tensor, gen: torch.Tensor, comp: torch.Tensor, n: int) -> torch.Tensor:
    """Mean code of each feature over each generation's completion tokens [n_gen width]."""
    with torch.no_grad():
        z = torch.cat([sae.encode(x[i : i + 4096]) for i in range(0, x.shape[0], 4096)])
    z, g = z[comp], gen[comp]
    tot = torch.zeros(n, z.shape[1]).index_add_(0, g, z)
    cnt = torch.zeros(n).index_add_(0, g, torch.ones(len(g))).clamp_min(1)
    return tot / cnt[:, None]


def select_and_test(f: torch.Tensor, y: torch.Tensor, tr: torch.Tensor, k: int = 5) -> tuple[list[int], list[float], list[float]]:
    """Top-k features by |AUROC - ½| on rows ``tr``; (features, train AUROC, held-out AUROC)."""
    a_tr = auroc(f[tr], y[tr])
    top = (a_tr - 0.5).abs().topk(k).indices.tolist()
    a_te = auroc(f[~tr][:, top], y[~tr])
    return top, [float(a_tr[j]) for j in top], [float(a) for a in a_te]


def _orient(a_tr: float, a_te: float) -> float:
    return a_te if a_tr >= 0.5 else 1.0 - a_te


def correctness(f: torch.Tensor, y: torch.Tensor, tr: torch.Tensor, seed: int) -> Correctness:
    """Held-out AUROC of the features selected on the training half, with a permutation baseline."""
    if len(set(y[tr].tolist())) < 2 or len(set(y[~tr].tolist())) < 2:
        return Correctness(note="one class only in a split; no AUROC")
    top, a_tr, a_te = select_and_test(f, y, tr)
    obs = _orient(a_tr[0], a_te[0])
    g = torch.Generator().manual_seed(seed * 1_000_003 + 171_717)
    null = []
    for _ in range(N_PERM):
        yp = y[torch.randperm(len(y), generator=g)]
        if len(set(yp[tr].tolist())) < 2 or len(set(yp[~tr].tolist())) < 2:
            continue
        _, ptr, pte = select_and_test(f, yp, tr, k=1)
        null.append(_orient(ptr[0], pte[0]))
    nt = torch.tensor(null)
    return Correctness(top, a_tr, a_te, obs, float(nt.mean()), float(nt.quantile(0.95)), len(null),
                       (1 + int((nt >= obs).sum())) / (1 + len(null)), int(tr.sum()), int((~tr).sum()),
                       float(y.float().mean()))


def alignment(sae: TopKSAE, s: torch.Tensor, seed: int) -> Alignment:
    """max_j |cos(W_dec[j], s)| and its feature, against 200 random Gaussian directions."""
    w = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=-1)
    c = w @ (s.float() / s.float().norm())
    j = int(c.abs().argmax())
    g = torch.Generator().manual_seed(seed * 1_000_003 + 424_242)  # not the SAE's init stream (same seed)
    r = torch.nn.functional.normalize(torch.randn(N_PERM, w.shape[1], generator=g), dim=-1)
    rand = (r @ w.T).abs().max(1).values
    top = c.abs().topk(5).indices.tolist()
    return Alignment(float(c.abs()[j]), j, float(torch.sign(c[j])), [(i, float(c[i])) for i in top],
                     float(rand.mean()), float(rand.quantile(0.95)), float(rand.max()))


def max_activating(lm: LM, sae: TopKSAE, x: torch.Tensor, acts: Activations, features: list[int], n: int = 5,
                   context: int = 8) -> list[MaxActivating]:
    """For each feature, the ``n`` tokens with the largest code, each with ``context`` tokens before it."""
    with torch.no_grad():
        pre = torch.cat([sae.encode(x[i : i + 4096])[:, features] for i in range(0, x.shape[0], 4096)])
    dec = lm.tokenizer.decode
    out = []
    for col, j in enumerate(features):
        vals, rows = pre[:, col].topk(min(n, pre.shape[0]))
        items = []
        for v, r in zip(vals.tolist(), rows.tolist()):
            same = (acts.gen == acts.gen[r]) & (acts.pos <= acts.pos[r]) & (acts.pos > acts.pos[r] - context - 1)
            ctx_ids = acts.ids[same].tolist()
            items.append(MaxToken(round(v, 4), dec([int(acts.ids[r])]), dec(ctx_ids[:-1]), bool(acts.completion[r])))
        out.append(MaxActivating(j, items))
    return out


def _fit_and_report(lm: LM, x: torch.Tensor, acts: Activations, gens: list[Generation], tr_tok: torch.Tensor,
                    tr_gen: torch.Tensor, s: torch.Tensor, cfg: ReasoningConfig, rows: torch.Tensor | None) -> SaeFit:
    """Train one SAE on the training tokens; FVE/L0 held out; correctness, alignment, max-activating."""
    keep = torch.ones(len(gens), dtype=torch.bool) if rows is None else rows
    fit = train_sae(x[tr_tok], SAEConfig(width=cfg.sae_width, k=cfg.sae_k, steps=1000, batch_size=256, lr=1e-3,
                                         seed=cfg.seed))
    fve, l0, dead = sae_metrics(fit.sae, x[~tr_tok])
    f = per_generation(fit.sae, x, acts.gen, acts.completion, len(gens))
    y = torch.tensor([g.correct for g in gens])
    cor = correctness(f[keep], y[keep], tr_gen[keep], cfg.seed)
    al = alignment(fit.sae, s, cfg.seed)
    feats = (cor.features or [])[:3] + [al.feature]
    return SaeFit(fit.fve, fit.l0, fve, l0, dead, int(tr_tok.sum()), int((~tr_tok).sum()), cfg.sae_width, cfg.sae_k,
                  cor, al, max_activating(lm, fit.sae, x, acts, list(dict.fromkeys(feats))))


def sae_runs(lm: LM, cfg: ReasoningConfig, vec: SteeringVector, layer: int) -> SaeRecord:
    """The whole SAE / DiffSAE analysis as one record (the ``sae`` step)."""
    gens = generations(lm, cfg, vec)
    acts = activations(lm, gens, vec, layer)
    n_prompts = max(g.prompt for g in gens) + 1
    g = torch.Generator().manual_seed(cfg.seed)
    train_prompts = torch.zeros(n_prompts, dtype=torch.bool)
    train_prompts[torch.randperm(n_prompts, generator=g)[: n_prompts // 2]] = True
    tr_gen = train_prompts[torch.tensor([x.prompt for x in gens])]
    tr_tok = tr_gen[acts.gen]
    s = vec[layer].float()
    plain = _fit_and_report(lm, acts.x, acts, gens, tr_tok, tr_gen, s, cfg, None)
    diff = _fit_and_report(lm, acts.diff, acts, gens, tr_tok, tr_gen, s, cfg, None)
    steered = torch.tensor([x.steered for x in gens])
    acc = {c: float(torch.tensor([x.correct for x in gens if x.steered == (c == "steered")]).float().mean())
           for c in ("base", "steered")}
    return SaeRecord(layer, acts.diff_layer, len(gens), n_prompts, int(steered.sum()), acc, plain, diff,
                     float(torch.nn.functional.cosine_similarity(acts.diff.mean(0), s, dim=0)),
                     [SaeExample(x.completion, x.steered, x.correct) for x in gens[:: max(1, len(gens) // 8)]])
