"""Planted mechanisms: weight surgery that fixes, by construction, which readers see a direction.

A ground truth for the mechanism card (:func:`steerscope.explain`): copies of a real model in which
chosen readers of the residual stream cannot see (:func:`blind`) or see more strongly
(:func:`amplify`) a steering vector s, so that a claim such as "the MLPs read s" is known to be
true or false before the card is computed (:data:`CASES`).

Algorithm (:func:`amplify`; :func:`blind` is ``factor=0``):
  1. Every reader of the residual stream reads it through an RMS norm, x_n = γ ⊙ x / rms(x): the
     q/k/v projections of block l' through its input norm, the MLP's input projections (gate, up)
     through its pre-MLP norm, the LM head through the final norm (γ from :meth:`LM.gamma`, so
     Gemma's 1 + w is included).
  2. Per norm, A = [γ ⊙ d_1 ... γ ⊙ d_k] (the directions' images in the normed space) and U an
     orthonormal basis of span(A) (rank-revealing SVD).
  3. P = U Uᵀ; with ``keep`` directions (K = γ ⊙ keep, Q an orthonormal basis of it) the oblique
     projection P = U (Cᵀ U)⁻¹ Cᵀ, C = (I - Q Qᵀ) U, so that P A = A and P K = 0 (no keep: P = U Uᵀ).
  4. Every input-side weight W [out d_model] of a chosen reader at layers >= l (q_proj, k_proj,
     v_proj; the MLP's gate_proj and up_proj; the LM head, untied first when tied to the
     embedding) becomes W' = W + (factor - 1) W P: W' A = factor · W A, W' K = W K, and W' equals W
     on the kernel of P (the orthogonal complement of U when nothing is kept). ``blind``:
     W' = W (I - P).

What a blind reader still sees: steered by α s at resid_pre of block l, it computes
W' γ ⊙ (x + α s) / rms(x + α s) = (rms(x) / rms(x + α s)) · W' x_n, so its output no longer depends
on the component along s except through the scalar 1/rms (one factor per position). No weight
edit removes that channel (the rms is taken over all of x); Gemma 3's and Qwen 3's q/k norms remove
it from queries and keys. Biases are untouched (they do not read the residual). The model's own
residual component along the directions is removed from (or amplified in) the reads too, so a
planted model's unsteered behaviour differs from the original's. Edits are computed in float32
from a float64 projector and cast back to the weight's dtype (bf16: W' A = 0 to bf16 rounding).

Supported: Llama, Mistral, Qwen2/3, Gemma 1/2/3 (RMS norms, separate q/k/v); others raise SiteError.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Callable, Collection, Literal, Mapping, Sequence

import torch

from steerscope.analyses.identifiability import random_orthogonal
from steerscope.errors import SiteError, VectorError
from steerscope.models.lm import LM
from steerscope.sites import Site
from steerscope.vector import SteeringVector

Read = Literal["q", "k", "v", "mlp", "unembed"]
READS: tuple[Read, ...] = ("q", "k", "v", "mlp", "unembed")
Verdict = Literal["supported", "contradicted"]
Surgery = Callable[[LM, SteeringVector], LM]


# -- 1. the math (pure) -----------------------------------------------------------------------
def _basis(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis [d r] of the column span of ``m`` [d k] (r = numerical rank, may be 0)."""
    svd = torch.linalg.svd(m, full_matrices=False)
    u: torch.Tensor = svd.U
    sv: torch.Tensor = svd.S
    top = float(sv.max()) if sv.numel() else 0.0
    return u[:, : int((sv > top * 1e-10).sum())] if top > 0 else u[:, :0]


def _matrix(x: torch.Tensor) -> torch.Tensor:
    """[d] or [k d] -> [k d], float64 on the CPU."""
    t = x.detach().double().cpu()
    return t[None] if t.dim() == 1 else t


def normed_projector(gamma: torch.Tensor, directions: torch.Tensor, keep: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The projector P = U B onto the normed-space images γ ⊙ d_i (oblique when ``keep`` is given).

    Args:
        gamma: the norm's effective scale γ [d_model].
        directions: residual-space directions [d_model] or [k d_model].
        keep: residual-space directions ([d_model] or [m d_model]) with P (γ ⊙ keep_j) = 0, or None (P = U Uᵀ).

    Returns:
        ``(U, B)``, float64 on the CPU: U [d_model r] an orthonormal basis of span(γ ⊙ d_i), B [r d_model];
        P = U @ B projects onto that span (P U = U).

    Raises:
        VectorError: a kept direction lies in the span of the directions (in the normed space).

    Example:
        >>> U, B = normed_projector(torch.ones(4), torch.eye(4)[:1])
        >>> (U @ B)[0, 0].item()
        1.0
    """
    g = gamma.detach().double().cpu()[:, None]
    u = _basis(g * _matrix(directions).T)
    if keep is None or u.shape[1] == 0:
        return u, u.T.contiguous()
    q = _basis(g * _matrix(keep).T)
    c = u - q @ (q.T @ u)
    gram = c.T @ u  # = Uᵀ (I - Q Qᵀ) U: symmetric, its eigenvalues are sin² of the principal angles
    if float(torch.linalg.eigvalsh(gram).min()) < 1e-8:
        raise VectorError("a keep direction lies in the span of the directions (after the norm's scale); "
                          "drop it from keep or from directions")
    b: torch.Tensor = torch.linalg.solve(gram, c.T)
    return u, b


# -- 2. the surgery --------------------------------------------------------------------------
def _rows(x: torch.Tensor, d_model: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().float().cpu()
    t = t[None] if t.dim() == 1 else t
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] != d_model:
        raise VectorError(f"{what} must be [d_model] or [k d_model] with d_model={d_model}, got {tuple(t.shape)}")
    if not torch.isfinite(t).all() or bool((t.norm(dim=1) == 0).any()):
        raise VectorError(f"{what} must be finite and non-zero")
    return t


def _check(lm: LM, layer: int, reads: Collection[str]) -> frozenset[str]:
    mt = lm.model.config.model_type
    norms = (lm.final_norm, lm.norm(0, "input"))
    if lm.family.qkv != "separate" or lm.parallel_residual or any(isinstance(n, torch.nn.LayerNorm) for n in norms):
        raise SiteError(f"planted surgery needs RMS norms and separate q/k/v projections (Llama, Mistral, Qwen2/3, "
                        f"Gemma 1-3); {mt} has LayerNorm or fused q/k/v")
    Site(layer, "resid_pre").check(lm.n_layers)
    chosen = frozenset([reads] if isinstance(reads, str) else reads)
    bad = sorted(chosen - set(READS))
    if bad or not chosen:
        raise SiteError(f"reads must be a non-empty subset of {', '.join(READS)}; got {bad or 'nothing'}")
    return chosen


def _weight(m: torch.nn.Module) -> torch.Tensor:
    w = m.weight
    assert isinstance(w, torch.Tensor)
    return w


def mlp_readers(lm: LM, layer: int) -> list[torch.nn.Linear]:
    """The MLP's input projections of block ``layer`` (gate and up): its Linear layers that read d_model,
    the output projection excepted (weights [out d_model], in module order).

    Example:
        >>> [type(m).__name__ for m in mlp_readers(lm, 3)]
        ['Linear', 'Linear']
    """
    down = lm.proj(layer, "down")
    mods = [m for m in lm.mlp(layer).modules()
            if isinstance(m, torch.nn.Linear) and m is not down and m.in_features == lm.d_model]
    if not mods:
        raise SiteError(f"block {layer}'s MLP has no Linear layer reading d_model={lm.d_model}")
    return mods


def _readers(lm: LM, layer: int, reads: frozenset[str]) -> list[tuple[torch.Tensor, list[torch.nn.Module]]]:
    """(γ of the norm, the modules reading through it) for every chosen reader at layers >= ``layer``."""
    out: list[tuple[torch.Tensor, list[torch.nn.Module]]] = []
    qkv: tuple[Literal["q", "k", "v"], ...] = ("q", "k", "v")
    attn = [r for r in qkv if r in reads]
    for l in range(layer, lm.n_layers):
        if attn:
            out.append((lm.gamma(l, "input"), [lm.proj(l, r) for r in attn]))
        if "mlp" in reads:
            out.append((lm.gamma(l, "pre_mlp"), list(mlp_readers(lm, l))))
    if "unembed" in reads:
        out.append((lm.final_gamma, [lm.unembedding]))
    return out


def _untie(lm: LM) -> None:
    """Give the LM head its own weight when it shares the embedding's (as :func:`steerscope.orthogonalize`)."""
    emb, unemb = lm.embedding, lm.unembedding
    if _weight(unemb) is _weight(emb):
        unemb.weight = torch.nn.Parameter(_weight(emb).detach().clone())
        lm.model.config.tie_word_embeddings = False


def _surgery(lm: LM, directions: torch.Tensor, layer: int, reads: Collection[str], factor: float,
             keep: torch.Tensor | None, tag: str) -> LM:
    chosen = _check(lm, layer, reads)
    dirs = _rows(directions, lm.d_model, "directions")
    kept = None if keep is None else _rows(keep, lm.d_model, "keep")
    new = LM(model=copy.deepcopy(lm.model), tokenizer=lm.tokenizer, name=f"{lm.name}+{tag}", family=lm.family)
    with torch.no_grad():
        if "unembed" in chosen:
            _untie(new)
        for gamma, modules in _readers(new, layer, chosen):
            u, b = normed_projector(gamma, dirs, kept)
            for m in modules:
                w = _weight(m)
                wf = w.float()
                w.copy_((wf + (factor - 1.0) * (wf @ u.to(wf)) @ b.to(wf)).to(w.dtype))
    return new


def blind(lm: LM, directions: torch.Tensor, layer: int, reads: Collection[Read],
          keep: torch.Tensor | None = None) -> LM:
    """A new LM whose readers ``reads`` at layers >= ``layer`` cannot see ``directions``: W' = W (I - P).

    A blind reader sees the directions only through its norm's scalar 1/rms(x) (module docstring).

    Args:
        lm: an RMS-normed model (a deep copy is edited; ``lm`` is not modified).
        directions: residual-space directions [d_model] or [k d_model] (norm irrelevant).
        layer: first block whose readers are edited (the steering layer l).
        reads: a subset of ``"q", "k", "v", "mlp", "unembed"``.
        keep: directions [d_model] or [m d_model] the readers must still see exactly as before (P is then
            the oblique projection of step 3), or None.

    Returns: the planted :class:`LM` (name ``<name>+blind``; a tied LM head is untied when ``unembed`` is read).

    Example:
        >>> planted = blind(lm, vec[12], 12, ("q", "k", "v"))  # heads cannot read s
        >>> with steering(planted, vec, 4.0): ...
    """
    return _surgery(lm, directions, layer, reads, 0.0, keep, "blind")


def amplify(lm: LM, directions: torch.Tensor, layer: int, reads: Collection[Read], factor: float,
            keep: torch.Tensor | None = None) -> LM:
    """A new LM whose readers ``reads`` at layers >= ``layer`` see ``directions`` ``factor`` times as strongly:
    W' = W + (factor - 1) W P, so W' (γ ⊙ d) = factor · W (γ ⊙ d).

    Args:
        lm, directions, layer, reads, keep: as :func:`blind` (``factor=0`` is :func:`blind`).
        factor: the gain on the directions' normed-space images (finite).

    Returns: the planted :class:`LM` (name ``<name>+amplified<factor>``).

    Example:
        >>> loud = amplify(lm, vec[12], 12, READS, 8.0)  # every reader sees s 8x as strongly
    """
    if not math.isfinite(factor):
        raise VectorError(f"factor must be finite, got {factor}")
    return _surgery(lm, directions, layer, reads, float(factor), keep, f"amplified{factor:g}")


# -- 3. the case table -----------------------------------------------------------------------
_SHARE, _CUT = " carry >= 20 % of the steering node's EAP-IG effect", " removes most of the effect"
CLAIMS: Mapping[str, str] = MappingProxyType({
    "attr.heads": "attention heads (q + k + v)" + _SHARE, "attr.qk": "head queries and keys" + _SHARE,
    "attr.v": "head values" + _SHARE, "attr.mlp": "MLP inputs" + _SHARE, "attr.direct": "the logits (s read directly)" + _SHARE,
    "frozen.qk.needed": "freezing attention patterns (QK)" + _CUT, "frozen.ov.needed": "freezing attention values (OV)" + _CUT,
    "frozen.svv.needed": "removing the steering value vectors" + _CUT, "frozen.mlp.needed": "removing s from the MLP inputs" + _CUT,
    "dose.effect": "at the chosen alpha, s changes behaviour more than a random direction of the same norm",
    "ident.not_identifiable": "s + v_perp is behaviourally equivalent to s",
})
"""Claim id -> meaning (the card's claims that :attr:`PlantedCase.expected` may name)."""


@dataclass(frozen=True)
class PlantedCase:
    """One planted mechanism: a surgery on (model, vector) and the claims it settles.

    ``expected`` names only claims true by construction. Left out: every claim whose truth depends
    on indirect effects, i.e. on a reader of what another path wrote after reading s (freezing QK
    when only the values read s: later queries read the changed head outputs; freezing OV when only
    queries and keys read s; any frozen or attribution claim about a path that stays open next to
    another open path), and every attribution share in ``no_effect`` (a ratio of leaks).
    Exact by construction: svv removal and MLP-input removal subtract W (γ ⊙ α s) / rms, which is 0
    for a blind W, so they are no-ops. The rest holds up to the 1/rms channel of the module
    docstring: a blind path still sees the per-position rms change. Most exposed to it:
    ``null_perp`` (s + v_perp differs from s only through rms, and |v_perp| = |s|) and
    ``no_effect`` (s acts only through rms, compared with a random direction that is read).
    Attribution shares are relative to the sum of the steering node's edges: when the paths left
    open nearly cancel, a blind path's leak can still reach 20 %.

    Attributes:
        name: the case id, e.g. ``"only_mlp"``.
        description: what the surgery does, in one sentence.
        surgery: ``(lm, vector) -> planted LM``; the vector has one ``resid_pre`` layer l.
        expected: claim id (:data:`CLAIMS`) -> ``"supported"`` or ``"contradicted"``.

    Example:
        >>> case = next(c for c in CASES if c.name == "only_mlp")
        >>> planted = case.surgery(lm, vec)
    """

    name: str
    description: str
    surgery: Surgery
    expected: Mapping[str, Verdict]


def _layer_and_s(lm: LM, vector: SteeringVector) -> tuple[int, torch.Tensor]:
    vector.check_compatible(lm)
    layer, s = vector.single_layer(purpose="a planted case")
    return layer, s


def blind_vector(lm: LM, vector: SteeringVector, reads: Collection[Read]) -> LM:
    """:func:`blind` to the vector s itself: readers ``reads`` at layers >= l cannot see s.

    Args: ``vector`` a one-layer ``resid_pre`` vector {l: s}; ``reads`` as :func:`blind`.
    Returns: the planted :class:`LM`.

    Example:
        >>> only_mlp = blind_vector(lm, vec.select([12]), ("q", "k", "v", "unembed"))
    """
    layer, s = _layer_and_s(lm, vector)
    return blind(lm, s, layer, reads)


def perp_directions(s: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """The card's identifiability directions: ``random_orthogonal(s, seed=i)`` per seed.

    Args: ``s`` the steering direction [d_model]; ``seeds`` the card's ``perp_seeds``.
    Returns: [k d_model], each row orthogonal to s with norm |s|.

    Example:
        >>> perp_directions(vec[12], (0, 1, 2)).shape
        torch.Size([3, 576])
    """
    return torch.stack([random_orthogonal(s.detach().float().cpu(), seed=i) for i in seeds])


def perp_surgery(lm: LM, vector: SteeringVector, seeds: Sequence[int], factor: float) -> LM:
    """Every reader at layers >= l sees the v_perp directions ``factor`` times (0: blind); every reader's
    view of s is kept exactly (``keep=s``: the oblique projection).

    Args: ``vector`` {l: s} (one ``resid_pre`` layer); ``seeds`` as :func:`perp_directions`; ``factor``
    the gain on v_perp (0: blind, as ``null_perp``).
    Returns: the planted :class:`LM`.

    Example:
        >>> null = perp_surgery(lm, vec.select([12]), (0, 1, 2), 0.0)
    """
    layer, s = _layer_and_s(lm, vector)
    return amplify(lm, perp_directions(s, seeds), layer, READS, factor, keep=s)


def unaltered(lm: LM, vector: SteeringVector) -> LM:
    """The control: the input ``lm`` itself (not a copy), after checking that ``vector`` fits it.

    Example:
        >>> unaltered(lm, vec.select([12])) is lm
        True
    """
    _layer_and_s(lm, vector)
    return lm


_S: Verdict = "supported"
_C: Verdict = "contradicted"
_ATTN: tuple[Read, ...] = ("q", "k", "v")
_BLIND_ROWS: tuple[tuple[str, tuple[Read, ...], str, dict[str, Verdict]], ...] = (
    ("attn_blind", _ATTN, "heads (q, k, v) cannot see s; MLPs and the LM head can",
     {"attr.heads": _C, "attr.qk": _C, "attr.v": _C, "frozen.svv.needed": _C}),
    ("mlp_blind", ("mlp",), "MLPs cannot see s; heads and the LM head can",
     {"attr.mlp": _C, "frozen.mlp.needed": _C}),
    ("unembed_blind", ("unembed",), "the LM head cannot see s; heads and MLPs can", {"attr.direct": _C}),
    ("only_attn", ("mlp", "unembed"), "only heads see s",
     {"attr.mlp": _C, "attr.direct": _C, "attr.heads": _S, "frozen.mlp.needed": _C}),
    ("only_mlp", (*_ATTN, "unembed"), "only MLPs see s",
     {"attr.heads": _C, "attr.qk": _C, "attr.v": _C, "attr.direct": _C, "attr.mlp": _S, "frozen.svv.needed": _C}),
    ("only_direct", (*_ATTN, "mlp"), "only the LM head sees s",
     {"attr.heads": _C, "attr.qk": _C, "attr.v": _C, "attr.mlp": _C, "attr.direct": _S, "frozen.svv.needed": _C,
      "frozen.mlp.needed": _C, "frozen.qk.needed": _C, "frozen.ov.needed": _C}),
    ("only_values", ("q", "k", "mlp", "unembed"), "only head values see s",
     {"attr.qk": _C, "attr.mlp": _C, "attr.direct": _C, "attr.v": _S, "attr.heads": _S, "frozen.svv.needed": _S,
      "frozen.ov.needed": _S, "frozen.mlp.needed": _C}),
    ("only_qk", ("v", "mlp", "unembed"), "only head queries and keys see s",
     {"attr.v": _C, "attr.mlp": _C, "attr.direct": _C, "attr.qk": _S, "attr.heads": _S, "frozen.svv.needed": _C,
      "frozen.qk.needed": _S, "frozen.mlp.needed": _C}),
    ("no_effect", READS, "no reader sees s", {"dose.effect": _C}),
)


def cases(seeds: Sequence[int] = (0, 1, 2), factor: float = 8.0) -> tuple[PlantedCase, ...]:
    """The case table (every reader at layers >= the vector's layer l; "sees s" up to the 1/rms channel).

    Args:
        seeds: the identifiability section's v_perp seeds (the card's ``perp_seeds``).
        factor: the gain on v_perp in ``perp_amplified``.

    Returns: the :class:`PlantedCase` rows: the ``_BLIND_ROWS`` (``attn_blind`` ... ``no_effect``),
    ``null_perp``, ``perp_amplified``, ``unaltered``.

    Example:
        >>> [c.name for c in cases()][:2]  # ['attn_blind', 'mlp_blind']
    """
    seeds = tuple(int(i) for i in seeds)
    rows = [PlantedCase(name, desc, partial(blind_vector, reads=reads), MappingProxyType(exp))
            for name, reads, desc, exp in _BLIND_ROWS]
    rows.append(PlantedCase("null_perp", f"s untouched; every reader is blind to v_perp (seeds {seeds})",
                            partial(perp_surgery, seeds=seeds, factor=0.0),
                            MappingProxyType({"ident.not_identifiable": _S})))
    rows.append(PlantedCase("perp_amplified", f"s untouched; every reader sees v_perp (seeds {seeds}) "
                            f"{factor:g}x amplified", partial(perp_surgery, seeds=seeds, factor=factor),
                            MappingProxyType({"ident.not_identifiable": _C})))
    rows.append(PlantedCase("unaltered", "the original model (control: no claim is known by construction)",
                            unaltered, MappingProxyType({})))
    return tuple(rows)


CASES: tuple[PlantedCase, ...] = cases()
"""The default case table (v_perp seeds 0, 1, 2 as the card's; amplification 8x)."""
