"""HTML report of the refusal study, from the step records only (no model code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from steerscope.analyses.selection import Candidate, Selection
from steerscope.report.html import Report, plt_figure
from steerscope.stats import wilson
from steerscope.studies.refusal.records import (
    EvaluateRecord,
    OrganismRecord,
    Results,
    Samples,
    SelectionRecord,
    Steered,
    TrainedRecord,
    Unsteered,
)


def heatmap(sel: Selection, what: str = "score") -> Any:
    """A matplotlib figure: ``what`` (score / bypass / induce) over layer x position."""
    grid = np.full((len(sel.positions), len(sel.layers)), np.nan)
    best: dict[tuple[int, int], Candidate] = {}  # with an alpha grid: the best-scoring alpha per cell
    for c in sel.candidates:
        if (c.layer, c.position) not in best or c.score < best[c.layer, c.position].score:
            best[c.layer, c.position] = c
    for c in best.values():
        grid[sel.positions.index(c.position), sel.layers.index(c.layer)] = getattr(c, what)
    fig = plt_figure(figsize=(9, 2.8))
    ax = fig.add_subplot(111)
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(sel.layers)), [str(l) for l in sel.layers], fontsize=7)
    ax.set_yticks(range(len(sel.positions)), [str(p) for p in sel.positions])
    ax.set_xlabel("layer")
    ax.set_ylabel("position")
    ax.scatter([sel.layers.index(sel.chosen.layer)], [sel.positions.index(sel.chosen.position)], marker="*",
               color="red", s=120)
    ax.set_title(f"DIM candidates: {what}")
    fig.colorbar(im, ax=ax)
    return fig


def _loss_figure(trained: TrainedRecord) -> Any:
    fig = plt_figure(figsize=(8, 3))
    for i, name in enumerate(("refusal-ntp", "refusal-po")):
        ax = fig.add_subplot(1, 2, i + 1)
        r = trained.curves[name]
        ax.plot(r.train_loss, label="train (per step)")
        n = len(r.train_loss)
        k = max(len(r.val_loss), 1)
        ax.plot([(e + 1) * n / k - 1 for e in range(len(r.val_loss))], r.val_loss, "o-", label="val (per epoch)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    return fig


def _rate(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{k / max(n, 1):.2f} [{lo:.2f}, {hi:.2f}]"


def _table2_row(name: str, alpha: Any, row: Unsteered | Steered, nh: int, ns: int) -> list[Any]:
    """One Table-2 row: ASR and induced refusal with Wilson intervals, and the looping counts."""
    loops = " / ".join("-" if x is None else str(x) for x in (row.harmful_repetitive, row.harmless_repetitive))
    return [name, alpha, _rate(nh - row.harmful_refused, nh), _rate(row.harmless_refused, ns), loops]


def write_report(folder: Path, results: Results) -> Path:
    """Write ``report.html`` (and the plots as PNG) into ``folder``; return its path."""
    r = Report(f"Refusal study: {results.model}")
    r.p(f"Vectors used for evaluation: {results.vector_source}. Greedy decoding, "
        f"{results.max_new_tokens} new tokens, paper A's 12-string refusal matcher; "
        "steering added at every position (prompt and generated) of the vector's layer.", note=True)
    ev = results.evaluate
    _asr_section(r, ev)
    _selection_section(r, results.select, folder)
    if results.cosines:
        r.h2("Pairwise cosines")
        r.table(["pair", "cosine"], [[k, v] for k, v in results.cosines.items()])
    if results.trained and "refusal-ntp" in results.trained.curves:
        r.h2("NTP / PO training")
        tr = results.trained
        r.p(f"{tr.n_train} training / {tr.n_val} validation examples after filtering.")
        r.figure(_loss_figure(tr), "loss curves", save_as=folder / "losses.png")
    _organism_section(r, results.organism)
    r.h2("Sample completions")
    rows: list[tuple[str, float | int, Samples]] = [("unsteered", 0, ev.unsteered.samples)]
    for method, alpha, samples in rows + [(s.method, s.alpha, s.samples) for s in ev.steered]:
        r.h3(f"{method} (|alpha| = {alpha})")
        r.pre("\n\n".join(f"[{side}] {p}\n-> {o}" for side, pairs in samples.sides().items() for p, o in pairs))
    return r.write(folder / "report.html")


def _asr_section(r: Report, ev: EvaluateRecord) -> None:
    """Paper A's Table 2: ASR and induced refusal per method, with Wilson intervals."""
    r.h2("ASR table (paper A, Table 2 layout)")
    nh, ns = ev.n_test
    rows = [_table2_row("unsteered", "-", ev.unsteered, nh, ns)]
    rows += [_table2_row(s.method, s.alpha, s, nh, ns) for s in ev.steered]
    r.table(["method", "|alpha|", "harmful-test ASR (bypass, -alpha)", "harmless-test refusal rate (induce, +alpha)",
             "looping completions (harmful / harmless)"],
            rows, caption=f"n = {nh} harmful / {ns} harmless test prompts; Wilson 95 % intervals; a looping "
                          "completion (fewer than half of its word trigrams distinct) counts as 'not a refusal'")


def _selection_section(r: Report, sel: SelectionRecord, folder: Path) -> None:
    """The chosen DIM candidate, the magnitude grid and KL-filter notes, heat maps and the best candidates."""
    r.h2("Direction selection")
    r.p(f"Chosen: layer {sel.layer}, position {sel.position} (bypass {sel.chosen.bypass:.3g}, "
        f"induce {sel.chosen.induce:.3g}, ablation KL {sel.chosen.kl}); unsteered refusal "
        f"log-odds {sel.baseline_harmful_logodds:.3g} (harmful val) / {sel.baseline_harmless_logodds:.3g} "
        f"(harmless val); DIM norm {sel.norm:.3g}.")
    if sel.alpha != 1.0:
        n = sel.norms
        r.p(f"Magnitude grid: the pick is at alpha = {sel.alpha:g} times the unnormalised DIM vector "
            f"(norm {n.get('unscaled', float('nan')):.3g}); the saved vector is scaled by that factor, so alpha = -1 / +1 "
            f"on it is the selected bypass / induce setting (|alpha s| / mean |resid| = "
            f"{n.get('scaled_over_resid', float('nan')):.2f}).", note=True)
    kl = sel.chosen.kl
    if kl is not None and kl >= 0.1:
        r.p(f"Filter failed: no candidate with induce > 0 has ablation KL < 0.1 (the chosen one: {kl:.3g}), "
            "so the best-scoring candidate was taken (Arditi et al.'s fallback is not defined; this is ours).",
            note=True)
    s = sel.selection()
    for what in ("score", "bypass", "induce"):
        r.figure(heatmap(s, what), f"{what} per candidate (star = chosen)", save_as=folder / f"heatmap_{what}.png")
    top = sorted(sel.candidates, key=lambda c: c.score if c.score is not None else c.candidate().score)[:8]
    r.table(["layer", "position", "alpha", "bypass", "induce", "KL", "score"],
            [[c.layer, c.position, c.alpha, c.bypass, c.induce, c.kl if c.kl is not None else "-", c.score]
             for c in top],
            caption="best-scoring candidates (KL computed lazily)")


def _organism_section(r: Report, organism: OrganismRecord) -> None:
    """The model organism's refusal statistics (shipped or measured) and its sample answers."""
    r.h2("Organism")
    org = organism.stats()  # a stats file's contents: its keys are data
    keys = [k for k in ("organism_refusal_harmful", "organism_refusal_harmless", "base_refusal_harmful",
                        "base_refusal_harmless", "kl_first_token_harmless", "kl_per_token_harmless") if k in org]
    if keys:
        n = org.get("n_test", ["?", "?"])
        r.table(["statistic", "value"], [[k, org[k]] for k in keys],
                caption=f"test split, {n[0]} harmful / {n[1]} harmless prompts, greedy 64 tokens; KL(base || organism)")
    r.pre(str({k: v for k, v in org.items() if k not in ("samples", "losses", *keys)}))
    for side in ("harmful", "harmless"):
        smp = (org.get("samples") or {}).get("organism", {}).get(side)
        if smp:
            r.h3(f"organism answers ({side} test prompts)")
            r.pre("\n\n".join(f"{p}\n-> {o}" for p, o in smp))
