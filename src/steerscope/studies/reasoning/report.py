"""HTML report of the reasoning study: accuracy with 95% intervals, training curves, lens tables,
first-token ΔP, prefix control, q/k/v patching bars, persistence, layer pairs; seeds, transfer,
the gated vector and SAE features (report_extras.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from steerscope.models.load import LM
from steerscope.report.html import Report, plt_figure
from steerscope.runs import Run, write_json
from steerscope.studies.reasoning import records as rc
from steerscope.studies.reasoning import report_extras as rx
from steerscope.studies.reasoning.config import ReasoningConfig
from steerscope.studies.reasoning.records import EvalRecord, Findings, LoraRecord, Summary, TrainRecord

Trained = dict[str, TrainRecord | LoraRecord]


def _ci(ci: Sequence[float] | None) -> str:
    return "" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _d(x: Sequence[float] | None) -> str:
    return "" if x is None else f"{x[0]:+.3f} [{x[1]:+.3f}, {x[2]:+.3f}]"


def _acc_table(r: Report, evals: dict[str, EvalRecord], summary: Summary, trained: Trained) -> None:
    holm = {row.name: row.p_holm for row in summary.family.rows}
    rows = []
    for n, e in evals.items():
        pd = summary.paired_vs_base.get(n)
        s, ch = (pd.sampled, pd.greedy_changed) if pd is not None else (None, None)
        t = trained.get(n)
        rows.append([n, 0 if t is None else t.n_trainable, e.n, e.k,
                     "" if e.sampled_acc is None else e.sampled_acc, _ci(e.sampled_ci),
                     "" if s is None else _d(s.diff), "" if s is None else f"{s.wilcoxon_p:.3g}",
                     holm.get(f"{n} vs base (pass@1, k = {e.k})", ""),
                     e.greedy_acc, _ci(e.greedy_ci), _d(None if pd is None else pd.greedy),
                     "" if ch is None else f"{ch.wrong_to_right} / {ch.right_to_wrong}",
                     "" if ch is None else f"{ch.mcnemar_p:.3g}", holm.get(f"{n} vs base (greedy)", "")])
    r.table(["condition", "trainable params", "n problems", "k samples", "pass@1 (T=1, mean of k)", "95% CI",
             "Δ pass@1 vs base [paired bootstrap]", "Wilcoxon p", "Holm p", "greedy acc", "95% Wilson",
             "Δ greedy vs base [normal approx., descriptive]", "wrong→right / right→wrong", "exact McNemar p", "Holm p"],
            rows, caption="Held-out accuracy. Primary: pass@1 averaged over k samples per problem at T = 1 "
            "(interval: cluster bootstrap over problems; paired difference: bootstrap over problems of the "
            "per-problem mean difference; test: Wilcoxon signed-rank). Secondary: greedy (Wilson interval; exact "
            "McNemar). Holm p: adjusted over the run's whole family of tests (section 'Tests').")


def _family(r: Report, fam: rc.Family) -> None:
    r.h2("Tests: one family, Holm-corrected")
    r.table(["comparison", "test", "effect (Δ acc)", "p", "Holm p", "verdict"],
            [[x.name, x.test, "" if x.effect is None else f"{x.effect:+.3f}", f"{x.p:.3g}",
              f"{x.p_holm:.3g}", x.verdict] for x in fam.rows],
            caption=f"m = {fam.m} paired comparisons; a difference is claimed when the Holm-adjusted "
            f"p < {fam.alpha}.")


def _curves(r: Report, trained: Trained, run: Run) -> None:
    fig = plt_figure(figsize=(7, 3.5))
    ax = fig.add_subplot(111)
    for n, t in trained.items():
        h = t.history
        if h:
            ys = [x.accuracy for x in h]
            sm = [sum(ys[max(0, i - 3): i + 1]) / len(ys[max(0, i - 3): i + 1]) for i in range(len(ys))]
            ax.plot([x.step for x in h], sm, label=n)
    ax.set_xlabel("RLOO step")
    ax.set_ylabel("sampled accuracy (running mean of 4)")
    ax.legend(fontsize=8)
    r.figure(fig, "Training reward curves (fraction of the k samples per prompt that were correct).",
             save_as=run.path("figures", "curves.png"))


def _patching(r: Report, rows: list[rc.PatchRow], run: Run) -> None:
    fig = plt_figure(figsize=(9, 3.2))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    for ax, w in zip(axes, "qkv"):
        sub = [x for x in rows if x.which == w]
        ax.bar([str(x.head) for x in sub], [x.kl for x in sub], color="#4477aa")
        ax.set_title(f"patch {w} (last layer)")
        ax.set_xlabel("head")
    axes[0].set_ylabel("KL(steered ‖ patched)")
    r.figure(fig, "Per-head q/k/v path patching of the penultimate-layer vector.", save_as=run.path("figures", "patching.png"))
    r.table(["which", "head", "KL", "completion log-prob", "fraction of steering effect removed"],
            [[x.which, x.head, x.kl, x.logprob, x.effect_removed] for x in rows])


def _lens(r: Report, run: Run, lm: LM) -> None:
    r.h2("Logit lens of each trained vector (top 10 of W_U·s)")
    lens = run.load_record(rc.LENS, rc.LensRecord).rows if run.done(rc.LENS) else []
    r.table(["vector", "layer", "final norm", "top tokens"],
            [[x.vector, x.layer, x.final_norm, " | ".join(repr(t) for t in x.tokens)] for x in lens
             if x.vector != "all" or x.layer >= lm.n_layers - 3 or x.layer % 5 == 0])


def _first_token(r: Report, ft: rc.FirstTokenRecord) -> None:
    r.h2("First generated token: change in probabilities caused by the last-layer vector")
    r.p(f"Mean total-variation distance: {ft.total_variation:.4f}.")
    r.table(["token", "mean ΔP", "P base", "P steered"], [list(x) for x in ft.up + ft.down])


def _prefix(r: Report, pr: rc.PrefixRecord) -> None:
    """The prefix control of each single-layer vector: its own top lens token written at the start of the response."""
    r.h2("Prefix control")

    def ch(c: rc.Changed) -> str:
        return f"{c.wrong_to_right} / {c.right_to_wrong} (net {c.net:+d}, McNemar p = {c.mcnemar_p:.3g})"

    r.table(["vector", "its top lens token (prefix)", "gain of the vector", "gain of the prefix", "ratio",
             "vector vs base: wrong→right / right→wrong", "prefix vs base", "prefix vs vector"],
            [[rc.vector_name(x.layer), repr(x.token), f"{x.gain_vector:+.3f}", f"{x.gain_prefix:+.3f}",
              f"{x.ratio:.2f}", ch(x.vector_vs_base), ch(x.prefix_vs_base), ch(x.prefix_vs_vector)]
             for x in pr.rows],
            caption="Greedy. Each vector's own top logit-lens token (W_U·s, no final norm) is written at the start of "
            "the response, without steering; its gain over base is compared with that vector's gain.")


def _persistence(r: Report, vectors: list[rc.VectorPersistence], run: Run) -> None:
    r.h2("Persistence of the per-token residual change")
    fig = plt_figure(figsize=(7, 3.2))
    ax = fig.add_subplot(111)
    rows = []
    for v in vectors:
        ax.plot([x.layer for x in v.rows], [x.cos_mean for x in v.rows], label=f"{v.vector} cos(Δh, mean Δh)")
        ax.plot([x.layer for x in v.rows], [x.cos_s for x in v.rows], "--", label=f"{v.vector} cos(Δh, s)")
        rows += [[v.vector, x.layer, x.cos_mean, x.cos_s, x.norm] for x in v.rows]
    ax.set_xlabel("layer (resid_post)")
    ax.legend(fontsize=7)
    r.figure(fig, "Mean per-token cosines of Δh with its mean and with s.", save_as=run.path("figures", "persistence.png"))
    r.table(["vector", "layer", "cos(Δh, mean)", "cos(Δh, s)", "|Δh|"], rows)


def _pairs(r: Report, pairs: rc.PairsRecord) -> None:
    r.h2("Layer pairs (independently trained single-layer vectors applied together; jointly trained pairs)")
    r.table(["pair", "greedy acc", "95% CI", "gain (acc_pair - max single)/(acc_all - max single)",
             "jointly trained: greedy acc", "95% CI", "gain"],
            [[f"{p.pair[0]}+{p.pair[1]}", p.eval.greedy_acc, _ci(p.eval.greedy_ci), p.gain,
              p.joint_eval.greedy_acc if p.joint_eval is not None else "not trained",
              _ci(p.joint_eval.greedy_ci) if p.joint_eval is not None else "", "" if p.joint_gain is None else p.joint_gain]
             for p in pairs.pairs])


def _findings(r: Report, run: Run, res: Findings) -> None:
    """The sections of what the run found beyond accuracy, each where it ran."""
    if res.first_token is not None:
        _first_token(r, res.first_token)
    if res.prefix:
        _prefix(r, res.prefix)
    if res.patching is not None:
        r.h2(f"q/k/v path patching of the layer-{res.patching.layer} vector")
        _patching(r, res.patching.rows, run)
    if res.persistence is not None:
        _persistence(r, res.persistence.vectors, run)
    if res.pairs is not None:
        _pairs(r, res.pairs)
    if res.seeds is not None:
        rx.seeds_section(r, res.seeds)
    rx.transfer_section(r, res.transfer)
    if res.gate is not None:
        rx.gate_section(r, res.gate)
    if res.sae is not None:
        rx.sae_section(r, res.sae, run)


def write_report(run: Run, cfg: ReasoningConfig, lm: LM, evals: dict[str, EvalRecord], trained: Trained,
                 res: Findings, summary: Summary) -> Path:
    """Write ``summary.json`` and ``report.html`` into the run folder; return the report's path.

    Example:
        >>> write_report(run, cfg, lm, evals, trained, Findings(), summary)
    """
    r = Report("Reasoning study: RL-trained steering vectors")
    r.p(f"Model {cfg.model} ({lm.n_layers} layers, d_model {lm.d_model}); task '{cfg.difficulty}', "
        f"{cfg.n_train} train / {cfg.n_test} test problems; RLOO with k={cfg.k}, {cfg.prompts_per_step} prompts "
        f"per step, {cfg.steps} steps, lr {cfg.lr} (LoRA rank {cfg.lora_rank}, lr {cfg.lora_lr}); "
        f"{cfg.max_new_tokens} new tokens; wall time {summary.seconds} s (this invocation).")
    r.h2("Accuracy")
    _acc_table(r, evals, summary, trained)
    _family(r, summary.family)
    r.h2("Training curves")
    _curves(r, trained, run)
    _lens(r, run, lm)
    _findings(r, run, res)
    r.h2("Examples (greedy)")
    for n, e in evals.items():
        r.pre(f"{n}:\n" + "\n".join(e.examples[:4]))
    r.h2("Steps")
    r.pre("\n".join(run.log))
    write_json(run.path("summary.json"), summary.to_dict())
    return r.write(run.path("report.html"))
