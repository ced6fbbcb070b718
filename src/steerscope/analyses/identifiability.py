"""Identifiability of steering vectors: is ``v`` the only vector that does what ``v`` does?

Algorithm (paper C's question, made measurable):
  1. Orthogonal perturbations: sample ``v_perp`` uniformly from the unit sphere of the orthogonal
     complement of ``v`` (Gaussian, project out ``v``, normalise) and rescale it to ``|v|``; for a
     k-dimensional test, sample an orthonormal basis of a random k-dim subspace of ``v``'s
     complement (QR of a projected Gaussian matrix).
  2. Behavioural equivalence: score generations under ``v``, ``v + v_perp``, ``v_perp`` and no
     steering with a trait classifier; compare the score samples with Cohen's d (pooled SD) and a
     percentile bootstrap 95% CI, the Pearson correlation of paired scores, and the Jensen-Shannon
     divergence of score histograms on shared bins.
  3. Next-token equivalence: L2 distance of next-token logits, top-1 agreement, top-k overlap.
  4. Null space: effective rank of a spectrum, two ways: the count of singular values above
     ``0.05 * sigma_max`` (paper C) and the entropy effective rank ``exp(H(p))``, ``p = s / sum s``
     (Roy & Vetterli 2007); null fraction ``1 - rank / d`` (paper C's code instead probes the Jacobian with
     1000 random unit directions and reports ``(probes - rank) / probes``: :func:`probe_null_fraction`).
     A small covariance rank says the stream barely *varies* along most directions; it is not a
     behavioural null space (directions along which steering changes nothing). Spectra come from the activation
     covariance across prompts and from the Jacobian of last-token logits with respect to the
     residual stream (``J = W_U @ d(final normed hidden)/d(resid)``; its singular values equal those
     of ``R @ J_f`` where ``W_U = Q R``, so the vocab x d_model matrix is never formed).
     :func:`residual_covariance_spectra` is the covariance spectrum the card and the study both use.

Citations: paper C (identifiability of steering vectors; see docs/identifiability.md); Cohen (1988);
Roy & Vetterli, "The effective rank" (EUSIPCO 2007).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from steerscope.analyses.records import Record
from steerscope.errors import SteerscopeError, VectorError
from steerscope.generation import chat_batch
from steerscope.hooks import Call, attached
from steerscope.models.load import LM
from steerscope.progress import progress
from steerscope.sites import Site
from steerscope.stats import bootstrap_ci, cohens_d, histogram_jsd
from steerscope.steer import recording


# -- 1. orthogonal perturbations ----------------------------------------------------------------
def orthogonal_subspace(v: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Orthonormal basis of a uniformly random k-dim subspace orthogonal to ``v``.

    Args:
        v: [d_model] non-zero direction.
        k: subspace dimension, 1 <= k <= d_model - 1.
        seed: random seed.

    Returns:
        [k d_model] with orthonormal rows, each orthogonal to ``v``.

    Example:
        >>> U = orthogonal_subspace(torch.randn(576), 5)
        >>> U.shape
        torch.Size([5, 576])
    """
    v = torch.as_tensor(v).double().flatten()
    d = v.shape[0]
    if not (1 <= k <= d - 1):
        raise VectorError(f"subspace dimension k={k} must be between 1 and d_model-1={d - 1}")
    if not torch.isfinite(v).all() or v.norm() == 0:
        raise VectorError("the direction must be finite and non-zero")
    u = v / v.norm()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, k, generator=g, dtype=torch.float64)
    x = x - torch.outer(u, u @ x)  # project out v
    q, _ = torch.linalg.qr(x)
    q = q - torch.outer(u, u @ q)  # re-orthogonalise against round-off
    q, _ = torch.linalg.qr(q)
    basis: torch.Tensor = q.T.float().contiguous()
    return basis


def random_orthogonal(v: torch.Tensor, seed: int = 0, norm: float | None = None) -> torch.Tensor:
    """A random vector orthogonal to ``v``, rescaled to ``norm`` (default ``|v|``). [d_model]."""
    v = torch.as_tensor(v).float()
    u = orthogonal_subspace(v, 1, seed)[0]
    return u * (float(v.norm()) if norm is None else norm)


def random_direction(d: int, norm: float, seed: int = 0) -> torch.Tensor:
    """A uniformly random direction in R^d scaled to ``norm``. [d]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, generator=g)
    out: torch.Tensor = x / x.norm() * norm
    return out


# -- 2. behavioural statistics (the numbers themselves: steerscope.stats) --------------------
@dataclass(frozen=True)
class Comparison(Record):
    """Two score samples compared: Cohen's d with a bootstrap CI, paired correlation, histogram JSD."""

    d: float
    ci_low: float
    ci_high: float
    mean_a: float
    mean_b: float
    n: int
    corr: float | None
    jsd: float

    @property
    def real_effect(self) -> bool:
        """|d| >= 0.5 with a CI that excludes 0."""
        return abs(self.d) >= 0.5 and (self.ci_low > 0 or self.ci_high < 0)

    def dci(self) -> str:
        """``d [ci_low, ci_high]`` to two decimals, e.g. ``+1.20 [+0.80, +1.70]``."""
        return f"{self.d:+.2f} [{self.ci_low:+.2f}, {self.ci_high:+.2f}]"


def compare(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, paired: bool = False, n_boot: int = 2000,
            seed: int = 0, bins: int = 10) -> Comparison:
    """Compare score samples ``a`` (treatment) and ``b`` (reference); ``paired``: same prompts/seeds."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    lo, hi = bootstrap_ci(x, y, cohens_d, n_boot=n_boot, seed=seed, paired=paired)
    corr = None
    if paired and x.std() > 0 and y.std() > 0:
        corr = float(np.corrcoef(x, y)[0, 1])
    return Comparison(cohens_d(x, y), lo, hi, float(x.mean()), float(y.mean()), len(x), corr,
                      histogram_jsd(x, y, bins=bins))


# -- 3. next-token agreement --------------------------------------------------------------------
@dataclass(frozen=True)
class LogitAgreement(Record):
    """Agreement of two sets of next-token logits over prompts (means over rows)."""

    l2: float
    top1: float
    topk_overlap: float
    k: int


def top1_matches(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether each row's top-1 token agrees between two sets of logits [batch vocab]: [batch] bool.

    Example:
        >>> top1_matches(torch.tensor([[0., 1.]]), torch.tensor([[2., 1.]])).tolist()
        [False]
    """
    return a.argmax(-1) == b.argmax(-1)


def logit_agreement(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> LogitAgreement:
    """Mean L2 distance, top-1 agreement and top-k overlap (|top_k(a) ∩ top_k(b)| / k).

    Args:
        a, b: [batch vocab] logits.
    """
    a, b = a.float(), b.float()
    if a.shape != b.shape or a.dim() != 2:
        raise SteerscopeError(f"logits must both be [batch vocab], got {tuple(a.shape)} and {tuple(b.shape)}")
    l2 = (a - b).norm(dim=-1).mean()
    top1 = top1_matches(a, b).float().mean()
    ta, tb = a.topk(k, dim=-1).indices, b.topk(k, dim=-1).indices
    overlap = (ta[:, :, None] == tb[:, None, :]).any(-1).float().sum(-1).mean() / k
    return LogitAgreement(float(l2), float(top1), float(overlap), k)


def _adder(d: torch.Tensor) -> Callable[[torch.Tensor, Call], torch.Tensor]:
    """A hook adding ``d`` ([d_model], or [batch d_model] per row) at every position."""
    def add(x: torch.Tensor, _c: Call) -> torch.Tensor:
        return x + (d if d.dim() == 1 else d[:, None, :])

    return add


def next_token_logits(lm: LM, prompts: Sequence[str], deltas: dict[int, torch.Tensor] | None = None,
                      batch_size: int = 32) -> torch.Tensor:
    """Last-token logits [n vocab] of chat-formatted prompts, adding ``deltas[layer]`` at resid_pre
    of each layer (all positions; [d_model] shared or [n d_model] per prompt)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = chat_batch(lm, prompts[i:i + batch_size])
        hooks: dict[str | Site, Callable[[torch.Tensor, Call], torch.Tensor | None]] = {}
        for layer, dl in (deltas or {}).items():
            d = dl if dl.dim() == 1 else dl[i:i + batch_size]
            hooks[Site(layer, "resid_pre")] = _adder(d.to(lm.device, lm.dtype))
        with attached(lm, hooks), torch.no_grad():
            out.append(lm.model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1].float().cpu())
    return torch.cat(out)


# -- 4. null space ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spectrum(Record):
    """Singular values with both effective ranks and null fractions."""

    sigma: list[float]
    rank_threshold: int
    rank_entropy: float
    null_fraction_threshold: float
    null_fraction_entropy: float
    d: int


def effective_rank_threshold(sigma: Sequence[float] | np.ndarray, frac: float = 0.05) -> int:
    """#{sigma_i > frac * sigma_max} (paper C's definition)."""
    s = np.asarray(sigma, float)
    return int((s > frac * s.max()).sum()) if s.size and s.max() > 0 else 0


def effective_rank_entropy(sigma: Sequence[float] | np.ndarray) -> float:
    """exp(H(p)), p_i = sigma_i / sum sigma (Roy & Vetterli 2007). In [1, len(sigma)]."""
    s = np.asarray(sigma, float)
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def spectrum(sigma: Sequence[float] | np.ndarray, d: int, frac: float = 0.05) -> Spectrum:
    """Bundle a spectrum with both effective ranks; ``d`` is the ambient dimension."""
    s = np.sort(np.asarray(sigma, float))[::-1]
    rt, re = effective_rank_threshold(s, frac), effective_rank_entropy(s)
    return Spectrum([float(x) for x in s], rt, re, 1 - rt / d, 1 - re / d, d)


@dataclass(frozen=True)
class ProbeNullFraction(Record):
    """Paper C's null fraction: ``(probes - rank) / probes`` of the matrix of ``n_probes`` probed Jacobian rows."""

    n_probes: int
    rank: int
    null_fraction: float


def probe_null_fraction(jac: torch.Tensor, n_probes: int = 1000, seed: int = 0, frac: float = 0.05
                        ) -> ProbeNullFraction:
    """Paper C's code's definition: probe ``jac`` [out d_in] with ``n_probes`` random unit directions u_i,
    stack the responses ``J u_i`` [n_probes out], count singular values > ``frac * sigma_max`` (the rank),
    and report ``(n_probes - rank) / n_probes``. The rank is at most d_in, so with more probes than d_in
    the fraction is at least 1 - d_in / n_probes whatever the model does: it counts probes, not dimensions
    (compare :func:`spectrum`'s ``1 - rank / d``).

    Example:
        >>> probe_null_fraction(torch.randn(8, 4) @ torch.randn(4, 16), n_probes=100).rank
        4
    """
    j = torch.as_tensor(jac).double()
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n_probes, j.shape[1], generator=g, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    rank = effective_rank_threshold(torch.linalg.svdvals(u @ j.T).numpy(), frac)
    return ProbeNullFraction(n_probes, rank, (n_probes - rank) / n_probes)


@dataclass(frozen=True)
class CovarianceSpectrum(Record):
    """The activation-covariance spectrum at one layer and the number of tokens it is measured over."""

    layer: int
    spectrum: Spectrum
    n_tokens: int


@torch.no_grad()
def residual_covariance_spectra(lm: LM, prompts: Sequence[str], layers: Sequence[int], batch_size: int = 16,
                                show_progress: bool = False) -> dict[int, CovarianceSpectrum]:
    """Covariance spectra of ``resid_pre`` at ``layers`` over the tokens of chat-formatted ``prompts``.

    Each text's first token is left out (the attention sink); the spectrum is that of
    :func:`covariance_singular_values` (both effective ranks, :func:`spectrum`). All layers are read in
    one forward pass per batch.

    Args:
        lm: the model.
        prompts: user messages (the chat template is applied).
        layers: block indices; ``resid_pre`` l is the stream entering block l.
        batch_size: prompts per forward pass (speed only).
        show_progress: a progress bar over the batches.

    Returns:
        {layer: :class:`CovarianceSpectrum`} (sigma of length min(n_tokens, d_model)).

    Example:
        >>> residual_covariance_spectra(lm, neutral_prompts(64), [15])[15].spectrum.null_fraction_threshold
    """
    sites = {layer: Site(layer, "resid_pre") for layer in layers}
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for i in progress(range(0, len(prompts), batch_size), desc="covariance", enabled=show_progress):
        enc = chat_batch(lm, prompts[i:i + batch_size])
        m = enc["attention_mask"].bool().clone()
        m[torch.arange(len(m)), m.float().argmax(1)] = False  # drop each text's first token (attention sink)
        with recording(lm, list(sites.values())) as cache:
            lm.model(**enc, use_cache=False)
        for layer, site in sites.items():
            rows[layer].append(cache[site][m].float().cpu())
    out = {}
    for layer in layers:
        x = torch.cat(rows[layer])
        out[layer] = CovarianceSpectrum(layer, spectrum(covariance_singular_values(x).numpy(), lm.d_model), len(x))
    return out


def covariance_singular_values(x: torch.Tensor) -> torch.Tensor:
    """Singular values of the sample covariance of rows of ``x`` [n d_model] (= squared singular
    values of the centred data / (n-1)). Returns [min(n, d)]."""
    x = x.double()
    xc = x - x.mean(0)
    sv: torch.Tensor = (torch.linalg.svdvals(xc) ** 2 / max(len(x) - 1, 1)).float()
    return sv


def final_jacobian(lm: LM, text: str, layer: int, chunk: int = 64) -> torch.Tensor:
    """Jacobian of the final normed hidden state of the last token with respect to the residual
    stream entering ``layer`` (resid_pre) at the last token. [d_model(out) d_model(in)].

    The prompt minus its last token runs once without grad; the last token then runs on the KV
    cache, so each of the d_model vector-Jacobian products (batched, ``chunk`` at a time) costs one
    token's backward pass.

    The logit Jacobian is ``lm.W_U @ final_jacobian(...)`` (W_U: [vocab d_model])."""
    enc = lm.tokenize([text], padding_side="left")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    past = None
    if ids.shape[1] > 1:
        with torch.no_grad():  # the prefix without grad: the Jacobian graph then holds one token only
            past = lm.cache_of(lm.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True))
    h = torch.zeros(lm.d_model, dtype=lm.dtype, device=lm.device, requires_grad=True)

    def add(x: torch.Tensor, call: Call) -> torch.Tensor:
        return x + h  # x: [1 1 d_model], the last token

    with attached(lm, {Site(layer, "resid_pre"): add}), torch.enable_grad():
        out = lm.model(input_ids=ids[:, -1:], attention_mask=mask, use_cache=True, output_hidden_states=True,
                       **{lm.cache_kw: past})
        y = out.hidden_states[-1][0, -1]  # [d_model], after the final norm
        if not _is_normed(lm, out):
            y = lm.final_norm(out.hidden_states[-1])[0, -1]
        eye = torch.eye(lm.d_model, dtype=y.dtype, device=y.device)
        rows = []
        for i in range(0, lm.d_model, chunk):
            g, = torch.autograd.grad(y, h, grad_outputs=eye[i:i + chunk], retain_graph=True, is_grads_batched=True)
            rows.append(_hi(g).cpu())
    return torch.cat(rows)  # [d_out d_in]


def _hi(x: torch.Tensor) -> torch.Tensor:
    """float64 stays float64; anything else becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


def _is_normed(lm: LM, out: object) -> bool:
    """Whether hidden_states[-1] already has the final norm applied (HF Llama/Gemma: yes)."""
    with torch.no_grad():
        hs = out.hidden_states[-1][:, -1:]  # type: ignore[attr-defined]
        ref = out.logits[:, -1:].float()  # type: ignore[attr-defined]
        return bool(torch.allclose(lm.unembedding(hs).float(), ref, atol=1e-3, rtol=1e-3))


def unembed_r(lm: LM) -> torch.Tensor:
    """R of the reduced QR of W_U [vocab d_model]: ``sigma(W_U @ A) = sigma(R @ A)``. [d_model d_model]."""
    r: torch.Tensor = torch.linalg.qr(lm.W_U().double(), mode="r").R.float()
    return r


def logit_jacobian_spectrum(lm: LM, text: str, layer: int, r: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values [d_model] of d(last-token logits)/d(resid_pre[layer], last token)."""
    jf = final_jacobian(lm, text, layer)
    r = unembed_r(lm) if r is None else r
    sv: torch.Tensor = torch.linalg.svdvals(r.double() @ jf.double()).float()
    return sv


def logits_with_delta(lm: LM, text: str, layer: int, delta: torch.Tensor) -> torch.Tensor:
    """Last-token logits [vocab] with ``delta`` added to resid_pre[layer] at the last token only."""
    enc = lm.tokenize([text], padding_side="left")
    dl = delta.to(lm.device, lm.dtype)

    def add(x: torch.Tensor, call: Call) -> torch.Tensor:
        x = x.clone()
        x[:, -1] = x[:, -1] + dl
        return x

    with attached(lm, {Site(layer, "resid_pre"): add}), torch.no_grad():
        return _hi(lm.model(**enc, use_cache=False).logits[0, -1]).cpu()


def finite_difference_check(lm: LM, text: str, layer: int, directions: torch.Tensor, eps: float = 1e-2,
                            jf: torch.Tensor | None = None) -> list[float]:
    """Relative error of ``J @ u`` (autograd) against central differences ``(f(+eps u) - f(-eps u)) / 2 eps``
    for each row ``u`` of ``directions`` [k d_model]."""
    jf = final_jacobian(lm, text, layer) if jf is None else jf
    wu = _hi(lm.W_U()).cpu()
    errs = []
    for u in directions.to(jf.dtype):
        jv = wu @ (jf @ u)
        fd = (logits_with_delta(lm, text, layer, eps * u) - logits_with_delta(lm, text, layer, -eps * u)) / (2 * eps)
        errs.append(float((jv - fd).norm() / fd.norm().clamp_min(1e-12)))
    return errs
