"""Interventions on the residual stream (steering, directional ablation, clamping, patching) and recording.

Each is a context manager built on :func:`steerscope.hooks.attached`; hooks are removed on exit,
on exception too. :func:`recording` is the read-only one: it stores what the sites carry in an
:class:`ActivationCache` and changes nothing. The math is in small pure functions (``add_at``, ``project_out``, ``clamp_along``).

Positions (``positions=``):
    ``"all"``        every position of every forward call, generated tokens included (paper A).
    ``"prompt"``     the prompt's columns only (the tokens of the call that starts the sequence).
    ``"generated"``  the columns after the prompt (each decoded token).
    ``"last-k"``     the last k real (non-pad) prompt tokens of each row, e.g. ``"last-4"``.
    ``"last+generated"`` the last prompt token, then each generated token: the last position of every
                     forward call with a KV cache (paper C's hook, ``h[:, -1] += alpha * v``).
    ``[i, j, ...]``  explicit prompt indices per row, negative from the end of the real prompt,
                     non-negative from its first real token (padding on either side handled).

Every spec selects absolute columns of the sequence, so ``generate`` steers the same positions with
and without the KV cache (``use_cache=False`` re-runs the whole sequence at each step; see
:class:`steerscope.hooks.Call` for how such a step is told from a new prompt).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from steerscope.conditional.condition import Gate
from steerscope.conditional.gate import GateState
from steerscope.errors import ConditionError, RecommendedAlpha, SiteError, VectorError
from steerscope.hooks import Call, HookFn, attached
from steerscope.models.lm import LM
from steerscope.sites import Site
from steerscope.vector import SteeringVector, check_finite

Positions = str | Sequence[int]
VectorLike = SteeringVector | torch.Tensor | str | Path
"""What the interventions accept as a vector: a :class:`SteeringVector`, a raw direction [d_model] (with
``layer=``), or the path or shipped name of a saved vector (:meth:`SteeringVector.load`)."""
_LAST = re.compile(r"^last[-:](\d+)$")
LAST_AND_GENERATED = "last+generated"


def check_positions(positions: Positions) -> Positions:
    """Validate a positions spec; raise :class:`SiteError` with the accepted forms."""
    if isinstance(positions, str):
        if positions in ("all", "prompt", "generated", LAST_AND_GENERATED) or _LAST.match(positions):
            return positions
        raise SiteError(f"positions {positions!r} not understood; use all, prompt, generated, last-K, "
                        f"{LAST_AND_GENERATED} or a list of ints")
    try:
        return [int(i) for i in positions]
    except (TypeError, ValueError):
        raise SiteError(f"positions must be a string or a list of ints, got {positions!r}") from None


def position_mask(call: Call, positions: Positions) -> torch.Tensor | None:
    """Which positions of the current call to touch: bool [batch pos], or None for all of them."""
    if positions == "all":
        return None
    assert call.mask is not None and call.prompt_mask is not None
    b, n, past = call.mask.shape[0], call.n_new, call.past
    P = call.prompt_mask.shape[1]
    cols = torch.arange(past, past + n, device=call.mask.device)
    in_prompt = (cols < P).expand(b, n)
    if positions == "prompt":
        return in_prompt
    if positions == "generated":
        return ~in_prompt
    if positions == LAST_AND_GENERATED:
        last = position_mask(call, "last-1")
        assert last is not None
        return last | ~in_prompt
    pm = call.prompt_mask.bool()
    real_len = pm.sum(1)  # [batch]
    start = pm.float().argmax(1)  # first real column (left padding)
    if isinstance(positions, str):
        k = int(_LAST.match(positions).group(1))  # type: ignore[union-attr]
        idx = torch.arange(-k, 0, device=pm.device)
    else:
        idx = torch.tensor(list(positions), device=pm.device)
    rel = torch.where(idx[None] < 0, real_len[:, None] + idx[None], idx[None].expand(b, -1))  # [batch k]
    ok = (rel >= 0) & (rel < real_len[:, None])
    absolute = torch.where(ok, start[:, None] + rel, torch.full_like(rel, -1))  # column in prompt coords
    mask = (absolute[:, :, None] == cols[None, None, :]).any(1)  # [batch n]
    return mask


def add_at(x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x + delta at masked positions. x [batch pos d_model]; delta [d_model] or [batch d_model]."""
    d = delta if delta.dim() == 1 else delta[:, None, :]
    if mask is None:
        return x + d
    return x + mask[..., None].to(x.dtype) * d


def project_out(x: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """Remove the component along unit ``r_hat``: x - (x·r̂) r̂. x [... d_model]."""
    return x - (x @ r_hat)[..., None] * r_hat


def clamp_along(x: torch.Tensor, r_hat: torch.Tensor, value: float) -> torch.Tensor:
    """Set the component along unit ``r_hat`` to ``value``."""
    return x + (value - x @ r_hat)[..., None] * r_hat


def per_row_deltas(vectors: SteeringVector | Sequence[SteeringVector], alpha: float | Sequence[float] | torch.Tensor,
             lm: LM) -> tuple[str, dict[int, torch.Tensor]]:
    """Deltas per layer: [d_model] when shared, [batch d_model] when per row."""
    vecs = [vectors] if isinstance(vectors, SteeringVector) else list(vectors)
    if not vecs:
        raise VectorError("no steering vector given")
    for v in vecs:
        v.check_compatible(lm)
    sites = {v.site for v in vecs}
    if len(sites) > 1:
        raise VectorError(f"all per-row vectors must share one site, got {sorted(sites)}")
    if isinstance(alpha, (int, float)):
        alphas = torch.tensor([check_finite(float(alpha), "alpha")])
    else:
        alphas = torch.as_tensor(alpha, dtype=torch.float32).flatten()
        if not torch.isfinite(alphas).all():
            raise VectorError("alpha contains NaN or inf")
    rows = max(len(vecs), len(alphas))
    if len(vecs) not in (1, rows) or len(alphas) not in (1, rows):
        raise VectorError(f"got {len(vecs)} vectors and {len(alphas)} alphas; give one, or one per batch row")
    layers = sorted({k for v in vecs for k in v.layers})
    out = {}
    for layer in layers:
        per = torch.stack([v.directions.get(layer, torch.zeros(v.d_model)) for v in vecs])  # [n d]
        delta = per * alphas[:, None]
        out[layer] = (delta[0] if rows == 1 else delta.expand(rows, -1)).to(lm.device, lm.dtype)
        if not torch.isfinite(out[layer]).all() or not torch.isfinite(out[layer].float().norm()):
            raise VectorError(f"alpha * vector at layer {layer} overflows the model's {lm.dtype} (inf or NaN); "
                              "use a smaller alpha")
    return vecs[0].site, out


def recommended(vector: SteeringVector | Sequence[SteeringVector], positions: Positions | None
                ) -> tuple[SteeringVector, float, Positions]:
    """The vector's own recommendation (its provenance ``use`` record, e.g. written by ``steerscope tune``):
    the vector restricted to the record's layers, its alpha, and its positions unless ``positions`` is given.

    Raises:
        VectorError: several vectors, no recommended alpha, or a record for another operation or site.
    """
    use = vector.provenance.use if isinstance(vector, SteeringVector) else None
    if not isinstance(vector, SteeringVector) or use is None or use.alpha is None:
        raise VectorError("no alpha given and this vector carries no recommended alpha (its provenance has no "
                          "'use' record); pass alpha=..., or tune one with `steerscope tune` / ss.tune")
    if use.operation != "add" or use.site != vector.site:
        raise VectorError(f"this vector's use record is for {use.operation} at {use.site}, not additive steering at "
                          f"{vector.site}; pass alpha=... to add it anyway")
    missing = [k for k in use.layers if k not in vector]
    if missing:
        raise VectorError(f"the use record names layers {missing} that this vector lacks; pass alpha=...")
    vec = vector.select(use.layers) if use.layers else vector
    pos = use.positions if positions is None else positions
    return vec, use.alpha, pos


@contextmanager
def steering(
    lm: LM,
    vector: VectorLike | Sequence[VectorLike],
    alpha: float | Sequence[float] | torch.Tensor | None = None,
    positions: Positions | None = None,
    layer: int | None = None,
    condition: Gate | None = None,
) -> Iterator[Call]:
    """Add ``alpha * vector[l]`` at the vector's site of every layer l it has.

    Args:
        lm: the model.
        vector: one vector, or one per batch row (rows steered differently in one batch); each a
            :class:`SteeringVector`, a raw tensor [d_model] (needs ``layer``) or a saved vector's path
            (:func:`as_vector`).
        alpha: scale; a float, or one per batch row. None: the vector's recommended alpha, at the layers
            and (unless ``positions`` is given) the positions of its ``use`` record (:func:`recommended`;
            a one-line warning says so); a vector without a recommendation is refused.
        positions: see the module docstring (default ``"all"``).
        layer: the layer of a raw tensor; for a vector or file, steer at this layer only.
        condition: a gate (:class:`steerscope.Condition`, or ``~`` / ``|`` / ``&`` of them): each row is steered
            only where its own gate is open (docs/conditional.md); it must read a layer <= the steering layers.

    Example:
        >>> with steering(lm, vec, alpha=-1.0):
        ...     out = lm.model.generate(**batch, max_new_tokens=32)
    """
    got = as_vectors(vector, lm, layer)
    vecs: SteeringVector | list[SteeringVector] = got if isinstance(got, SteeringVector) else \
        [v for v in got if v is not None]
    if isinstance(got, list) and len(got) != len(vecs):
        raise VectorError("a per-row vector is None; give every row a vector (alpha=0 leaves a row unsteered)")
    if alpha is None:
        vecs, alpha, positions = recommended(vecs, positions)
        warnings.warn(f"no alpha given: using the vector's recommended alpha {alpha:.4g} at layers "
                      f"{vecs.layers}, positions {positions!r}", RecommendedAlpha, stacklevel=3)
    positions = check_positions("all" if positions is None else positions)
    site, deltas = per_row_deltas(vecs, alpha, lm)
    if condition is not None:
        with attached(lm, gated_additions(lm, [(condition, site, deltas)], positions)) as call:
            yield call
        return
    hooks = {}
    for at, delta in deltas.items():
        def fn(x: torch.Tensor, call: Call, delta: torch.Tensor = delta) -> torch.Tensor:
            _check_rows(delta, x)
            return add_at(x, delta, position_mask(call, positions))
        hooks[Site(at, site)] = fn
    with attached(lm, hooks) as call:
        yield call


def _check_rows(delta: torch.Tensor, x: torch.Tensor) -> None:
    if delta.dim() == 2 and delta.shape[0] != x.shape[0]:
        raise VectorError(f"{delta.shape[0]} per-row vectors/alphas for a batch of {x.shape[0]} rows")


def gated_additions(lm: LM, rules: Sequence[tuple[Gate | None, str, dict[int, torch.Tensor]]],
                    positions: Positions) -> dict[Site, list[HookFn]]:
    """Hooks that add each rule's deltas (``{layer: [d_model] or [batch d_model]}`` at its site) where its gate
    is open and no earlier rule's is (first match wins; :class:`steerscope.conditional.gate.GateState`).

    The gate is a per-row (or per-position) 0/1 weight computed in the forward: a shut row gets ``x + 0``.

    Example:
        >>> site, deltas = per_row_deltas(vec, 4.0, lm)
        >>> with attached(lm, gated_additions(lm, [(harmful, site, deltas)], "all")): ...
    """
    first = min((layer for _g, _s, deltas in rules for layer in deltas), default=0)
    state = GateState(lm, [g for g, _s, _d in rules], first)
    hooks = state.hooks()
    for at in sorted({(layer, site) for _g, site, deltas in rules for layer in deltas}):
        def fn(x: torch.Tensor, call: Call, at: tuple[int, str] = at) -> torch.Tensor:
            m = position_mask(call, positions)
            weights = state.weights(call, x.shape[0], x.shape[1])
            total = None
            for w, (_g, site, deltas) in zip(weights, rules):
                if site != at[1] or at[0] not in deltas:
                    continue
                d = deltas[at[0]]
                _check_rows(d, x)
                w = w if m is None else w * m
                term = w[..., None].to(x.dtype) * (d if d.dim() == 1 else d[:, None, :])
                total = term if total is None else total + term
            return x if total is None else x + total
        hooks.setdefault(Site(*at), []).append(fn)
    return hooks


def as_vector(vector: VectorLike, lm: LM, layer: int | None = None) -> SteeringVector:
    """Coerce what a user passes as a vector into a :class:`SteeringVector` (the callers check it against ``lm``).

    Args:
        vector: a SteeringVector, a raw direction tensor [d_model], or a saved vector's path or shipped name.
        lm: the model the vector is for.
        layer: the layer of a raw tensor (required for one); for a vector or file, keep only this layer.

    Raises:
        VectorError: a tensor without ``layer``, of the wrong shape, or a layer the vector lacks.

    Example:
        >>> as_vector(torch.randn(lm.d_model), lm, layer=6).layers
        [6]
    """
    if isinstance(vector, torch.Tensor):
        if layer is None:
            raise VectorError("a raw tensor has no layer; pass layer=<int> (or make ss.SteeringVector({layer: t}))")
        if vector.dim() != 1:
            raise VectorError(f"a raw direction must be 1-D [d_model], got shape {tuple(vector.shape)}")
        vector = SteeringVector({int(layer): vector})
    elif isinstance(vector, (str, Path)):
        vector = SteeringVector.load(vector, n_layers=lm.n_layers)
    elif not isinstance(vector, SteeringVector):
        raise VectorError(f"expected a SteeringVector, a tensor [d_model] or a vector file, got {type(vector).__name__}")
    if layer is not None and vector.layers != [layer]:
        if layer not in vector:
            raise VectorError(f"layer={layer} is not in this vector (it has layers {vector.layers})")
        vector = vector.select([layer])
    return vector


def as_vectors(vector: VectorLike | Sequence[VectorLike | None], lm: LM, layer: int | None = None
               ) -> SteeringVector | list[SteeringVector | None]:
    """:func:`as_vector` on one vector-like, or on each of a per-row list of them (None rows stay None)."""
    if isinstance(vector, (SteeringVector, torch.Tensor, str, Path)):
        return as_vector(vector, lm, layer)
    return [None if v is None else as_vector(v, lm, layer) for v in vector]


def _unit(direction: VectorLike, lm: LM) -> torch.Tensor:
    if isinstance(direction, (str, Path)):
        direction = as_vector(direction, lm)
    if isinstance(direction, SteeringVector):
        if len(direction) != 1:
            raise VectorError("directional ablation takes one direction; select a single layer of the vector")
        direction.check_compatible(lm)
        direction = direction[direction.layers[0]]
    d = torch.as_tensor(direction).float()
    if d.shape != (lm.d_model,):
        raise VectorError(f"direction has shape {tuple(d.shape)}, the model needs [{lm.d_model}]")
    if not torch.isfinite(d).all() or d.norm() == 0:
        raise VectorError("direction must be finite and non-zero")
    unit: torch.Tensor = (d / d.norm()).to(lm.device, lm.dtype)
    return unit


@contextmanager
def ablation(lm: LM, direction: VectorLike, layers: Sequence[int] | None = None) -> Iterator[Call]:
    """Directional ablation (Arditi et al.): project r̂ out of resid_pre, attn_out and mlp_out
    at every layer (or ``layers``), all positions.

    Example:
        >>> with ablation(lm, refusal_vec):
        ...     lm.model.generate(**batch)
    """
    r = _unit(direction, lm)
    fn = lambda x, _c: project_out(x, r)
    hooks = {Site(l, p): fn for l in (layers if layers is not None else range(lm.n_layers))
             for p in ("resid_pre", "attn_out", "mlp_out")}
    with attached(lm, hooks) as call:
        yield call


Bound = float | Sequence[float] | torch.Tensor | None
"""A clamp bound: None (unbounded), one number, or one per batch row."""


def clip_along(x: torch.Tensor, r_hat: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None
               ) -> torch.Tensor:
    """Clip the component along unit ``r_hat`` into [lo, hi]: h + (clip(h·r̂, lo, hi) − h·r̂) r̂.

    Args:
        x: [batch pos d_model].
        r_hat: unit [d_model].
        lo, hi: None (that side unbounded), a 0-d tensor, or [batch 1] (per row).

    Example:
        >>> clip_along(x, r, torch.tensor(-1.0), torch.tensor(1.0))  # |x·r| <= 1 afterwards
    """
    p = x @ r_hat  # [batch pos]
    c = p if lo is None else torch.maximum(p, lo)
    c = c if hi is None else torch.minimum(c, hi)
    return x + (c - p)[..., None] * r_hat


def _bound(b: Bound, name: str, lm: LM) -> torch.Tensor | None:
    """A clamp bound as a 0-d tensor or [batch 1] (model device and dtype)."""
    if b is None:
        return None
    t = torch.as_tensor(b, dtype=torch.float32).flatten() if not isinstance(b, (int, float)) else \
        torch.tensor(float(b))
    if not bool(torch.isfinite(t).all()) or t.numel() == 0:
        raise ConditionError(f"clamp bound {name} must be finite numbers (one, or one per batch row)")
    return (t if t.dim() == 0 else t[:, None]).to(lm.device, lm.dtype)


@contextmanager
def clamping(lm: LM, vector: SteeringVector, value: float | None = None, positions: Positions = "all",
             lo: Bound = None, hi: Bound = None, condition: Gate | None = None) -> Iterator[Call]:
    """Clamp the component along each layer's unit direction at the vector's site, token by token.

    Either set it to ``value`` (h ← h + (value − h·v̂) v̂), or hold it in a range (a projection clamp):
    h ← h + (clip(h·v̂, lo, hi) − h·v̂) v̂, which changes nothing where the projection is already inside.

    Args:
        lm: the model.
        vector: the directions, one per layer it has (only their direction counts).
        value: the projection to set (not with ``lo`` / ``hi``).
        positions: see the module docstring.
        lo, hi: the range of the projection clamp: None (that side open), a number, or one per batch row.
        condition: clamp only rows (positions) whose gate is open (see :func:`steering`).

    Example:
        >>> with clamping(lm, refusal_vec.select([8]), lo=-2.0, hi=2.0):
        ...     lm.model.generate(**batch)
    """
    positions = check_positions(positions)
    if (value is None) == (lo is None and hi is None):
        raise ConditionError("give clamping either value=<number> or a range lo=/hi= (not both, not neither)")
    fixed = None if value is None else torch.tensor(check_finite(float(value), "clamp value"))
    lo_t, hi_t = _bound(lo, "lo", lm), _bound(hi, "hi", lm)
    vector.check_compatible(lm)
    state = None if condition is None else GateState(lm, [condition], min(vector.layers))
    hooks: dict[Site, list[HookFn]] = state.hooks() if state is not None else {}
    for layer in vector.layers:
        r = _unit(vector[layer], lm)

        def fn(x: torch.Tensor, call: Call, r: torch.Tensor = r) -> torch.Tensor:
            for b in (lo_t, hi_t):
                if b is not None and b.dim() == 2 and b.shape[0] != x.shape[0]:
                    raise ConditionError(f"{b.shape[0]} per-row clamp bounds for a batch of {x.shape[0]} rows")
            new = clamp_along(x, r, float(fixed)) if fixed is not None else clip_along(x, r, lo_t, hi_t)
            m = position_mask(call, positions)
            if state is not None:
                w = state.weights(call, x.shape[0], x.shape[1])[0].bool()
                m = w if m is None else m & w
            return new if m is None else torch.where(m[..., None], new, x)
        hooks.setdefault(Site(layer, vector.site), []).append(fn)
    with attached(lm, hooks) as call:
        yield call


@contextmanager
def patching(lm: LM, values: Mapping[str | Site, torch.Tensor], positions: Sequence[int] | None = None) -> Iterator[Call]:
    """Activation patching: replace sites with values from another run's cache.

    Args:
        values: site -> tensor of the site's shape in the patched call (e.g. from :func:`recording`).
        positions: optional indices of the ``pos`` axis to patch; others keep their own values.
    """
    hooks = {}
    for name, val in values.items():
        site = Site.parse(name)

        def fn(x: torch.Tensor, _c: Call, val: torch.Tensor = val, site: Site = site) -> torch.Tensor:
            if val.shape != x.shape:
                raise SiteError(f"patch for {site} has shape {tuple(val.shape)} but the run has {tuple(x.shape)}; "
                                "record the source run with the same tokens")
            v = val.to(x.device, x.dtype)
            if positions is None:
                return v
            out = x.clone()
            out[:, list(positions)] = v[:, list(positions)]
            return out
        hooks[site] = fn
    with attached(lm, hooks) as call:
        yield call


def _param(m: torch.nn.Module) -> torch.Tensor:
    """A module's weight Parameter itself (not detached: edited in place)."""
    w = m.weight
    assert isinstance(w, torch.Tensor)
    return w


def orthogonalize(lm: LM, direction: VectorLike) -> LM:
    """Weight orthogonalisation (Arditi et al.): a new LM whose writes to the residual stream have
    no component along r̂: W ← W − r̂r̂ᵀW for the embeddings, every attention output projection and
    every MLP output projection (biases too). Equals :func:`ablation` at every layer.

    Families with norms after attention/MLP (Gemma 2/3) are refused: the direction is not removed
    by orthogonalising the projection in front of a norm.
    """
    if lm.has_post_norms:
        raise SiteError(f"weight orthogonalisation is exact only without post-sublayer norms; "
                        f"{lm.model.config.model_type} has them. Use steerscope.ablation instead.")
    r = _unit(direction, lm).float()
    model = copy.deepcopy(lm.model)
    new = LM(model=model, tokenizer=lm.tokenizer, name=f"{lm.name}+orthogonalized", family=lm.family)

    def ortho_out(w: torch.Tensor, out_dim_first: bool) -> torch.Tensor:
        wf = w.float()
        if out_dim_first:  # Linear [out=d_model, in]
            return (wf - torch.outer(r, r @ wf)).to(w.dtype)
        return (wf - torch.outer(wf @ r, r)).to(w.dtype)  # [.., d_model] rows

    def edit(m: torch.nn.Module, out_dim_first: bool) -> None:
        w, b = _param(m), getattr(m, "bias", None)
        w.copy_(ortho_out(w, out_dim_first))
        if isinstance(b, torch.Tensor):
            b.copy_(project_out(b.float(), r).to(b.dtype))

    with torch.no_grad():
        emb, unemb = new.embedding, new.unembedding
        if _param(unemb) is _param(emb):  # tied (SmolLM2, Gemma): untie the readout
            unemb.weight = torch.nn.Parameter(_param(emb).detach().clone())
            new.model.config.tie_word_embeddings = False
        edit(emb, out_dim_first=False)
        if lm.model.config.model_type == "gpt2":  # learned position embeddings also write to the stream
            edit(new.model.transformer.wpe, out_dim_first=False)
        for layer in range(new.n_layers):
            for which in ("o", "down"):
                edit(new.proj(layer, which), out_dim_first=not lm.layout.o_conv1d)
    return new


# -- recording ---------------------------------------------------------------------------------------


class ActivationCache(Mapping[str, torch.Tensor]):
    """Site -> recorded tensors, one per forward call, in each site's documented shape.

    A read-only :class:`collections.abc.Mapping` keyed by canonical site names (``"blocks.6.resid_pre"``;
    a :class:`Site` or any spelling :meth:`Site.parse` accepts works for lookups): ``len``, iteration,
    ``in``, ``keys``, ``values``, ``items`` and ``get``. ``cache[site]`` is the concatenation over calls
    along the ``pos`` axis (a generation's prefill and its decoded tokens; under ``generate``, ``logits``
    has one position per call, and :meth:`last` gives the stream positions that line up with it); ``cache.calls(site)`` gives
    the per-call list (attention patterns have a different key length per call, so use ``calls`` for
    them: ``cache[site]``, ``values()`` and ``items()`` raise :class:`SiteError` for a pattern recorded
    over several calls). A site that was not recorded raises :class:`SiteError` (``get`` returns the default).
    Two caches are equal only if they are the same object (tensors have no single truth value).

    Example:
        >>> with recording(lm, ["blocks.6.resid_pre"]) as cache:
        ...     lm.model(**batch)
        >>> {site: x.shape for site, x in cache.items()}
    """

    def __init__(self) -> None:
        self._data: dict[str, list[torch.Tensor]] = {}

    def _add(self, site: str, x: torch.Tensor) -> None:
        self._data.setdefault(site, []).append(x)

    def calls(self, site: str | Site) -> list[torch.Tensor]:
        """The per-call tensors recorded at ``site``, in call order."""
        key = str(Site.parse(site))
        if key not in self._data:
            raise SiteError(f"{key} was not recorded (recorded: {', '.join(self._data) or 'nothing yet'})")
        return self._data[key]

    def last(self, site: str | Site) -> torch.Tensor:
        """The last position of every call at ``site``, stacked along ``pos`` ([batch calls ...]).

        Under ``generate`` this is what lines up with ``cache["logits"]``: HF computes logits only at each
        call's last position (the prefill's last prompt token, then each decoded token), so
        ``cache.last(resid)[:, j]`` is the stream that produced ``cache["logits"][:, j]``, the j-th new
        token's prediction, while ``cache[resid]`` holds every position (prompt + new tokens - 1).

        Example:
            >>> with recording(lm, ["blocks.6.resid_pre", "logits"]) as cache:
            ...     lm.model.generate(**batch, max_new_tokens=8)
            >>> cache.last("blocks.6.resid_pre").shape[1] == cache["logits"].shape[1]  # 8 each
            True
        """
        return torch.stack([x[:, -1] for x in self.calls(site)], dim=1)

    def __getitem__(self, site: str | Site) -> torch.Tensor:
        parts = self.calls(site)
        if len(parts) == 1:
            return parts[0]
        if Site.parse(site).point == "attn.pattern":
            raise SiteError("attention patterns of several calls differ in key length; use cache.calls(site)")
        return torch.cat(parts, dim=1)

    def __contains__(self, site: object) -> bool:
        if not isinstance(site, (str, Site)):
            return False
        try:
            return str(Site.parse(site)) in self._data
        except SiteError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def get(self, site: str | Site, default: Any = None) -> Any:
        """``cache[site]`` if ``site`` was recorded, else ``default``."""
        return self[site] if site in self else default

    __eq__ = object.__eq__  # Mapping's item-wise == would compare tensors
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"ActivationCache({', '.join(f'{k}: {len(v)} call(s)' for k, v in self._data.items()) or 'empty'})"

    def clear(self) -> None:
        """Forget everything recorded so far."""
        self._data.clear()


@contextmanager
def recording(lm: LM, sites: Iterable[str | Site], grad: bool = False, dtype: torch.dtype | None = None
              ) -> Iterator[ActivationCache]:
    """Record activations at ``sites`` for every forward call inside the block.

    Args:
        lm: the model.
        sites: e.g. ``["blocks.6.resid_pre", "blocks.3.attn.pattern"]``.
        grad: keep the autograd graph (no detach/clone), for attribution.
        dtype: store as this dtype (default: the model's).

    Example:
        >>> with recording(lm, ["blocks.6.resid_pre"]) as cache:
        ...     lm.model(**batch)
        >>> cache["blocks.6.resid_pre"].shape  # [batch pos d_model]
    """
    cache = ActivationCache()

    def make(key: str) -> HookFn:
        def fn(x: torch.Tensor, _c: Call) -> None:
            y = x if grad else x.detach().clone()
            cache._add(key, y if dtype is None else y.to(dtype))
        return fn

    hooks: dict[Site, HookFn] = {}
    for s in sites:
        site = Site.parse(s)
        hooks[site] = make(str(site))
    with attached(lm, hooks):
        yield cache
