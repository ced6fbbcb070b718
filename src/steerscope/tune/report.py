"""``report.html`` of a tuning run: the validation surface (layer x dose heatmap) beside the test
figure, so a reader sees how much the search overfits; then the recommendation and the trials."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from steerscope.report.html import Report, plt_figure
from steerscope.tune.records import SearchRecord, TuneResult


def surface(rec: SearchRecord) -> tuple[list[int], list[float], np.ndarray, np.ndarray]:
    """(layers, grid doses, objective per layer x dose [layers doses], partial [layers doses]).

    A trial counts in the grid column nearest its dose on a log scale; each cell keeps the best complete
    trial over positions, else the best pruned one's running objective (``partial`` True), else NaN.
    """
    layers, scales = sorted(rec.layers), list(rec.scales)
    out, partial = np.full((len(layers), len(scales)), np.nan), np.zeros((len(layers), len(scales)), bool)
    logs = np.log(np.asarray(scales))
    for t in sorted(rec.trials, key=lambda t: t.state == "complete"):  # complete trials last: they win
        if t.state not in ("complete", "pruned") or not math.isfinite(t.objective) or t.layer not in layers:
            continue
        i, j = layers.index(t.layer), int(np.argmin(np.abs(logs - math.log(t.scale))))
        if t.state == "complete" and partial[i, j]:
            out[i, j], partial[i, j] = np.nan, False
        if np.isnan(out[i, j]) or t.objective > out[i, j]:
            out[i, j], partial[i, j] = t.objective, t.state == "pruned"
    return layers, scales, out, partial


def figure(res: TuneResult) -> Any:
    """The heatmap (left) and the chosen configuration's validation vs test effect (right)."""
    layers, scales, z, partial = surface(res.search)
    fig = plt_figure(figsize=(10, 0.35 * len(layers) + 2.5))
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    im = ax.imshow(np.ma.masked_invalid(z), aspect="auto", origin="lower", cmap="viridis")
    ax.set_xticks(range(len(scales)), [f"{s:.3g}" for s in scales], rotation=45)
    ax.set_yticks(range(len(layers)), [str(k) for k in layers])
    ax.set_xlabel("dose f = |alpha v| / mean residual norm")
    ax.set_ylabel("layer")
    best = res.search.best
    from matplotlib.patches import Rectangle

    col = int(np.argmin(np.abs(np.log(scales) - math.log(best.scale))))
    ax.add_patch(Rectangle((col - 0.5, layers.index(best.layer) - 0.5), 1, 1, fill=False, ec="r", lw=2.5))
    for (i, j), v in np.ndenumerate(z):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2g}" + ("*" if partial[i, j] else ""), ha="center", va="center", fontsize=7,
                    color="w" if v < np.nanmean(z) else "k")
    ax.set_title("validation objective (best over positions; * pruned early)")
    fig.colorbar(im, ax=ax)
    t = res.test.effect
    bx.bar([0, 1], [res.test.validation_effect, t.value], color=["#888", "#2a7"])
    if t.finite:
        bx.errorbar([1], [t.value], yerr=[[t.value - t.ci95[0]], [t.ci95[1] - t.value]], color="k", capsize=6)
    bx.set_xticks([0, 1], [f"validation (n={res.split['validation']})", f"test (n={t.n})"])
    bx.set_ylabel(res.test.metric)
    bx.set_title("chosen configuration: effect")
    fig.tight_layout()
    return fig


def write_report(res: TuneResult, path: str | Path) -> Path:
    """Write the HTML report of ``res``."""
    r, t, s = res.recommended, res.test, res.search
    rep = Report(f"steerscope tune: {res.model}")
    rep.p(f"Recommended: layer {r.layer}, alpha {r.alpha:.4g} (dose {r.scale:.3g}; range {r.alpha_range[0]:.4g} to "
          f"{r.alpha_range[1]:.4g}), positions {r.positions}, site {r.site}, KL budget {r.kl_budget:g} nats.")
    rep.p(f"Test split: effect {t.effect.value:.4g} [{t.effect.ci95[0]:.4g}, {t.effect.ci95[1]:.4g}] "
          f"(n = {t.effect.n} pairs; {t.metric}); worst-5 % KL {t.kl_worst5.value:.3g} "
          f"[{t.kl_worst5.ci95[0]:.3g}, {t.kl_worst5.ci95[1]:.3g}] over {t.kl_worst5.n} neutral prompts. "
          f"The same configuration's validation effect: {t.validation_effect:.4g}.")
    rep.figure(figure(res), "Left: the validation objective over layer x dose (red box: the choice; blank: not "
               "scored; *: the running objective of a trial the pruner stopped). Right: the chosen configuration's "
               "effect on validation (where it was chosen) and on test (measured once, 95 % interval).")
    rep.p(f"Search: {s.mode}, {s.evaluations} configurations scored of a {s.grid_size}-point grid "
          f"(cost {s.cost:.3g} full evaluations); objective: {s.objective}. Split: {res.split}; seed {res.seed}; "
          f"method {res.method}; scorer {res.scorer}; data {res.data_hash}.", note=True)
    top = sorted((x for x in s.trials if x.state == "complete"), key=lambda x: -x.objective)[:15]
    rep.table(["trial", "layer", "positions", "dose", "alpha", "effect", "KL q95", "penalty", "objective"],
              [[x.number, x.layer, str(x.positions), x.scale, x.alpha, x.effect, x.kl_worst5, x.penalty, x.objective]
               for x in top], caption="the best complete trials (validation)")
    return rep.write(path)
