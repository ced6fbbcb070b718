"""Adaptive token-wise scaling: the gated penultimate-layer vector against the plain one.

The gated bias adds g_t s at ``mlp_out`` of layer l with g_t = 1 + tanh(w·rms_norm(h_t) + b) read
from ``resid_mid`` (:class:`steerscope.analyses.trainable.SteeringBias` with ``gate=True``); it is trained
with the plain vector's trainer, budget and seed. Reported: greedy accuracy, paired against the plain
vector and the base model; g_t on the test prompts' tokens (a heatmap in the report); and where the
gate mass goes, by token category: the question's number tokens, the question's other words, the
instruction ("Put the final answer within \\boxed{}."), and the chat-template tokens (role markers,
the default system prompt, newlines).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from safetensors.torch import load_file

from steerscope.analyses.trainable import SteeringBias
from steerscope.models.load import LM
from steerscope.runs import Run
from steerscope.stats import mcnemar_p, paired_diff
from steerscope.studies.reasoning import records as rc
from steerscope.studies.reasoning import steps as st
from steerscope.studies.reasoning.config import ReasoningConfig
from steerscope.studies.reasoning.records import (
    Accuracy,
    Comparison,
    EvalRecord,
    GateMass,
    GateRow,
    GateSummary,
    GateValuesRecord,
    TrainRecord,
)
from steerscope.studies.reasoning.task import INSTRUCTION, Problem

CATEGORIES = ("number", "question", "instruction", "template")


def load_gated(run: Run, lm: LM, name: str, layer: int) -> SteeringBias:
    """The trained gated bias ``name`` (its s, w and b) on ``lm``."""
    bias = SteeringBias(lm, [layer], gate=True)
    bias.load_state_dict({k: v.to(lm.device) for k, v in load_file(str(run.path("vectors", f"{name}.policy.safetensors"))).items()})
    return bias


def token_category(text: str, start: int, end: int, question: tuple[int, int], instruction: tuple[int, int]) -> str:
    """The category of the token covering characters [start, end) of the formatted prompt."""
    piece = text[start:end]
    a = start + len(piece) - len(piece.lstrip())  # a leading space belongs to the word
    if not piece.strip():
        return "template"
    if question[0] <= a and end <= question[1]:
        return "number" if any(c.isdigit() for c in piece) else "question"
    if instruction[0] <= a and end <= instruction[1]:
        return "instruction"
    return "template"


def gate_values(lm: LM, bias: SteeringBias, texts: list[str], problems: list[Problem]) -> list[GateRow]:
    """Per prompt: tokens, their category and g_t (teacher-forced on the prompt alone)."""
    layer = bias.layers[0]
    out = []
    for text, p in zip(texts, problems):
        enc = lm.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False, return_tensors="pt")
        offs = enc.pop("offset_mapping")[0].tolist()
        with torch.no_grad(), bias.active() as call:
            lm.model(**{k: v.to(lm.device) for k, v in enc.items()})
            h = call.store[f"steerscope.gate_h.{layer}"]
        hn = h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        g = (1.0 + torch.tanh(hn @ bias.w[str(layer)].float() + bias.b[str(layer)].float()))[0]
        qs = text.rfind(p.question)  # the last: few-shot turns come before it
        ins = text.find(INSTRUCTION, qs)
        q, i = (qs, qs + len(p.question)), (ins, ins + len(INSTRUCTION))
        toks = [text[a:b] for a, b in offs]
        cats = [token_category(text, a, b, q, i) for a, b in offs]
        out.append(GateRow(toks, cats, [round(float(x), 4) for x in g.tolist()]))
    return out


def gate_mass(rows: list[GateRow]) -> dict[str, GateMass]:
    """Per category: token share, share of the gate mass Σg, mean g, and mean |g - 1|."""
    n: dict[str, int] = defaultdict(int)
    mass: dict[str, float] = defaultdict(float)
    dev: dict[str, float] = defaultdict(float)
    for r in rows:
        for c, g in zip(r.categories, r.gate):
            n[c] += 1
            mass[c] += g
            dev[c] += abs(g - 1.0)
    tn, tm = sum(n.values()), sum(mass.values())
    return {c: GateMass(n[c], n[c] / tn, mass[c] / tm, mass[c] / n[c], dev[c] / n[c]) for c in CATEGORIES if n[c]}


def gate_runs(run: Run, lm: LM, cfg: ReasoningConfig, layer: int, test: list[Problem], base_eval: EvalRecord,
              plain_eval: EvalRecord) -> GateSummary | None:
    """Resumable steps ``train_L<l>_gated``, ``eval_L<l>_gated``, ``gate_values``; returns the summary.

    Example:
        >>> gate_runs(run, lm, cfg, 28, test, evals["base"], evals["L28"]).vs_plain.mcnemar_p
    """
    name = rc.gated_name(layer)
    t = run.record(rc.train_step(name), TrainRecord, lambda: st.train_vector(run, lm, cfg, name, [layer], gate=True))
    if t is None:  # --report-only and not trained yet
        return None
    bias = load_gated(run, lm, name, layer)
    ev = run.record(rc.eval_step(name), EvalRecord, lambda: st.evaluate(lm, test, cfg, name, bias.active, samples=0))
    probs = test[: cfg.n_analysis]
    texts = st.chat_texts(lm, cfg, probs)
    vals = run.record(rc.GATE_VALUES, GateValuesRecord, lambda: GateValuesRecord(gate_values(lm, bias, texts, probs)))
    if ev is None or vals is None:
        return None
    return GateSummary(
        layer, t.n_trainable, float(bias.s[str(layer)].detach().norm()), float(bias.b[str(layer)].detach()),
        float(bias.w[str(layer)].detach().norm()), Accuracy.of(ev),
        Comparison(paired_diff(plain_eval.greedy, ev.greedy), mcnemar_p(plain_eval.greedy, ev.greedy)),
        Comparison(paired_diff(base_eval.greedy, ev.greedy), mcnemar_p(base_eval.greedy, ev.greedy)),
        gate_mass(vals.rows), len(vals.rows), vals.rows[:8])
