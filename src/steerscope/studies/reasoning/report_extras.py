"""Report sections for the extras (extras.py): SAE/DiffSAE, seeds, transfer, gated vector heatmap."""

from __future__ import annotations

import html
from typing import Any, Sequence

from steerscope.report.html import Report, plt_figure
from steerscope.runs import Run
from steerscope.studies.reasoning.records import GateSummary, SaeFit, SaeRecord, SeedsSummary, TransferSummary


def _d(x: Sequence[float] | None) -> str:
    return "" if x is None else f"{x[0]:+.3f} [{x[1]:+.3f}, {x[2]:+.3f}]"


def _ci(ci: Sequence[float] | None) -> str:
    return "" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def seeds_section(r: Report, sd: SeedsSummary) -> None:
    """The headline over training seeds.

    Example:
        >>> seeds_section(Report("x"), seeds_summary(base, per_seed))
    """
    r.h2("Headline over seeds: penultimate-layer vector vs base (greedy, paired)")
    r.table(["seed", "greedy acc", "95% CI", "Δ vs base (paired 95% CI)", "gained / lost", "McNemar p", "‖s‖"],
            [[x.seed, x.greedy_acc, _ci(x.greedy_ci), _d(x.diff), f"{x.gained} / {x.lost}",
              x.mcnemar_p, x.norm] for x in sd.rows],
            caption=f"n = {sd.n} test problems; base accuracy {sd.base_acc:.3f}.")
    sdd = "–" if sd.sd_diff is None else f"{sd.sd_diff:.3f}"
    r.p(f"Mean Δ over {len(sd.rows)} seeds {sd.mean_diff:+.3f} (sd {sdd}, range {sd.min_diff:+.3f} to "
        f"{sd.max_diff:+.3f}); {sd.n_significant} of {len(sd.rows)} seeds have a paired 95% interval above 0.")


def transfer_section(r: Report, tr: TransferSummary | None) -> None:
    """Transfer both ways between A and B (or why it did not run).

    Example:
        >>> transfer_section(Report("x"), TransferSummary(False, note="not run"))
    """
    r.h2("Transfer")
    if tr is None or not tr.done:
        r.p("not run" if tr is None or tr.note is None else tr.note)
        return
    a, b, acc = tr.model_a, tr.model_b, tr.accuracy
    r.p(f"A = {a}, B = {b}: {tr.relation or 'relation not recorded'}.")
    labels = (("A_base", a, "unsteered"), ("A_own", a, "own vector"), ("B_to_A", a, f"{b}'s vector"),
              ("B_base", b, "unsteered"), ("B_own", b, "own vector"), ("A_to_B", b, f"{a}'s vector"))
    cap = f"Layer {tr.layer}; ‖s_A‖ = {tr.norm_a:.1f}"
    if tr.cosine_a_b is not None:
        cap += f", ‖s_B‖ = {tr.norm_b:.1f}, cos(s_A, s_B) = {tr.cosine_a_b:.3f}"
    r.table(["model", "condition", "greedy acc", "95% CI"],
            [[m, lab, acc[k].greedy_acc, _ci(acc[k].greedy_ci)] for k, m, lab in labels if k in acc],
            caption=cap + ". Rows missing: not run.")
    rows = []
    for tgt, cmps in ((a, tr.on_A), (b, tr.on_B)):
        for k, lab in (("transferred_vs_base", "transferred − unsteered"), ("transferred_vs_own", "transferred − own"),
                       ("own_vs_base", "own − unsteered")):
            if k in cmps:
                rows.append([tgt, lab, _d(cmps[k].diff), cmps[k].mcnemar_p])
    r.table(["on model", "comparison", "Δ greedy (paired 95% CI)", "McNemar p"], rows)


def _cell(tok: str, g: float) -> str:
    a = min(1.0, abs(g - 1.0) / 0.5)
    col = f"rgba(214,39,40,{a:.2f})" if g > 1 else f"rgba(31,119,180,{a:.2f})"
    t = html.escape(tok).replace("\n", "⏎")
    return f'<span title="g={g:.3f}" style="background:{col};padding:1px 0;font-family:monospace">{t}</span>'


def gate_section(r: Report, gt: GateSummary) -> None:
    """The gated vector against the plain one, its gate mass by token category and a token heatmap.

    Example:
        >>> gate_section(Report("x"), gate_runs(run, lm, cfg, 28, test, base, plain))
    """
    r.h2(f"Adaptive token-wise scaling (gated layer-{gt.layer} vector)")
    e = gt.eval
    r.p(f"Gated vector: greedy {e.greedy_acc:.3f} {_ci(e.greedy_ci)} (n = {e.n}); vs the plain vector "
        f"{_d(gt.vs_plain.diff)} (McNemar p = {gt.vs_plain.mcnemar_p:.3g}); vs base "
        f"{_d(gt.vs_base.diff)} (p = {gt.vs_base.mcnemar_p:.3g}). ‖s‖ = {gt.norm:.2f}, "
        f"gate bias b = {gt.gate_b:+.3f}, ‖w‖ = {gt.gate_w_norm:.3f}; {gt.n_trainable} trainable parameters.")
    r.table(["token category", "tokens", "token share", "gate-mass share", "mean g", "mean |g − 1|"],
            [[c, m.tokens, m.token_share, m.mass_share, m.mean_gate, m.mean_abs_dev]
             for c, m in gt.mass.items()],
            caption=f"g_t = 1 + tanh(w·ĥ_t + b) on the prompt tokens of {gt.n_prompts} test prompts.")
    lines = ["".join(_cell(t, g) for t, g in zip(row.tokens, row.gate)) for row in gt.heatmap]
    r.raw("<p>Token heatmap of g_t (red: g &gt; 1, blue: g &lt; 1; full colour at |g − 1| ≥ 0.5; hover for the value):</p>"
          + "".join(f'<div style="margin:4px 0;line-height:1.8">{x}</div>' for x in lines))


def _sae_table_rows(name: str, s: SaeFit) -> list[list[Any]]:
    c, al = s.correctness, s.alignment
    auc = "" if c.auroc_heldout is None else (
        f"{c.best_heldout_oriented:.3f} (null mean {c.null_mean:.3f}, q95 {c.null_q95:.3f}, p = {c.p_perm:.3f})")
    return [[name, s.width, s.k, s.fve_heldout, s.l0_heldout, s.dead_fraction, auc,
             f"{al.max_abs_cos:.3f} (random q95 {al.random_q95:.3f}, max {al.random_max:.3f})"]]


def sae_section(r: Report, sa: SaeRecord, run: Run) -> None:
    """The SAE and DiffSAE: fit, correctness AUROC, decoder alignment, max-activating tokens.

    Example:
        >>> sae_section(Report("x"), sae_runs(lm, cfg, vec, 28), run)
    """
    r.h2(f"SAE features at layer {sa.layer} (DiffSAE: steered − unsteered at layer {sa.diff_layer})")
    r.p(f"{sa.n_generations} sampled generations of {sa.n_prompts} train prompts ({sa.n_steered} steered); "
        f"sampled accuracy unsteered {sa.sampled_acc['base']:.3f}, steered {sa.sampled_acc['steered']:.3f}. "
        f"cos(mean Δh, s) = {sa.diff_mean_cos_s:.3f}.")
    r.table(["SAE", "width", "k", "FVE (held-out tokens)", "L0", "dead", "best held-out AUROC correct vs incorrect",
             "max |cos(decoder, s)|"], _sae_table_rows("SAE", sa.sae) + _sae_table_rows("DiffSAE", sa.diffsae))
    _sae_figure(r, (sa.sae, sa.diffsae), run)
    for fit, nm in ((sa.sae, "SAE"), (sa.diffsae, "DiffSAE")):
        c = fit.correctness
        if c.features is not None:
            r.table([f"{nm} feature", "AUROC train", "AUROC held-out"],
                    [[j, a, b] for j, a, b in zip(c.features, c.auroc_train or [], c.auroc_heldout or [])])
        rows = [[m.feature, it.value, repr(it.context[-60:]), repr(it.token), it.in_completion]
                for m in fit.max_activating for it in m.top]
        r.table([f"{nm} feature", "code", "context", "token", "in completion"], rows,
                caption="Max-activating tokens of the top correctness features and the feature best aligned with s.")


def _sae_figure(r: Report, fits: tuple[SaeFit, SaeFit], run: Run) -> None:
    fig = plt_figure(figsize=(8, 3.2))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    names = ["SAE", "DiffSAE"]
    for i, fit in enumerate(fits):
        c = fit.correctness
        if c.auroc_heldout is not None:
            ax1.bar(i - 0.2, c.best_heldout_oriented, 0.4, color="#4477aa", label="selected feature" if i == 0 else None)
            ax1.bar(i + 0.2, c.null_q95, 0.4, color="#bbbbbb", label="permutation q95" if i == 0 else None)
        al = fit.alignment
        ax2.bar(i - 0.2, al.max_abs_cos, 0.4, color="#ee6677", label="trained vector" if i == 0 else None)
        ax2.bar(i + 0.2, al.random_q95, 0.4, color="#bbbbbb", label="random q95" if i == 0 else None)
    for ax, t in ((ax1, "held-out AUROC (correct)"), (ax2, "max |cos(W_dec, s)|")):
        ax.set_xticks([0, 1], names)
        ax.set_title(t, fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    r.figure(fig, "SAE features: correctness AUROC vs a permutation baseline; decoder alignment with the trained "
             "vector vs random directions.", save_as=run.path("figures", "sae.png"))
