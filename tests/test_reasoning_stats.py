"""The reasoning study's statistics (issue 25): pass@1 over k samples, per-row sampling seeds, the prefix
control against its own vector, one Holm-corrected family of tests, the transfer pair's name, the harder task."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from steerscope import stats
from steerscope.errors import SteerscopeError
from steerscope.generation import RowSeededSampler, SeededSampler
from steerscope.studies.reasoning import analyses as an
from steerscope.studies.reasoning import records as rc
from steerscope.studies.reasoning import transfer
from steerscope.studies.reasoning.config import ReasoningConfig
from steerscope.studies.reasoning.family import family
from steerscope.studies.reasoning.records import EvalRecord
from steerscope.studies.reasoning.task import DIFFICULTIES, MULTI_STEP, Problem, examples, make_problems, split, worked


def _ev(g, sampled=(), k=0):
    return EvalRecord("x", sum(g) / len(g), (0, 1), None, None, None, len(g), k, len(sampled), list(g), list(sampled), [])


def test_row_seeded_sampler_draws_each_row_as_its_own_seeded_sampler():
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(3, 1, dtype=torch.long)
    rows, alone = RowSeededSampler(1.0, [7, 8, 9]), [SeededSampler(1.0, s) for s in (7, 8, 9)]
    for _ in range(3):  # the streams advance step by step, as in generate
        batch = rows(ids, scores)
        for i in range(3):
            assert torch.equal(batch[i], alone[i](ids[i:i + 1], scores[i:i + 1])[0])
    swapped = RowSeededSampler(1.0, [9, 7])(ids[:2], scores[[2, 0]])  # another batch: the same draw per row
    assert torch.equal(swapped[0], SeededSampler(1.0, 9)(ids[:1], scores[2:3])[0])
    with pytest.raises(SteerscopeError):
        RowSeededSampler(1.0, [1])(ids, scores)


def test_pass_at_1_is_the_mean_of_per_problem_means_with_a_cluster_interval():
    # 3 problems, k = 2, sample-major: sample 0 = [1, 0, 0], sample 1 = [1, 1, 0]
    ev = an.EvalResult("x", [1, 0, 0], [1, 0, 0, 1, 1, 0], [], k=2).summary()
    assert an.per_problem(ev.sampled, 3) == [1.0, 0.5, 0.0]
    assert ev.sampled_acc == pytest.approx(0.5) and ev.k == 2
    assert ev.sampled_ci is not None and ev.sampled_ci_kind is not None
    lo, hi = ev.sampled_ci
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0 and ev.sampled_ci_kind.startswith("cluster bootstrap")
    with pytest.raises(Exception):
        an.per_problem([1, 0, 1, 1], 3)


def test_sampled_comparison_by_hand_and_wilcoxon_exact_tail():
    n, k = 5, 2
    base = _ev([0] * n, [0] * (n * k), k)
    # per-problem differences 0.5, 1, 0.5, 1, 0.5 -> ties; take distinct magnitudes instead with k = 4
    k = 4
    base = _ev([0] * n, [0] * (n * k), k)
    per = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]  # 0.25 .. 1.0 (one tie)
    steered = _ev([0] * n, [per[i][r] for r in range(k) for i in range(n)], k)
    c = an.sampled_comparison(base, steered)
    assert c is not None and c.diff[0] == pytest.approx((0.25 + 0.5 + 0.75 + 1 + 1) / 5)
    assert c.diff[1] <= c.diff[0] <= c.diff[2] and c.better == 5 and c.worse == 0
    from scipy.stats import wilcoxon

    assert c.wilcoxon_p == pytest.approx(wilcoxon([0.25, 0.5, 0.75, 1, 1]).pvalue)
    # no ties: the exact two-sided tail of the signed-rank statistic, all 5 positive: 2 / 2^5
    per = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    steered = _ev([0] * n, [per[i][r] for r in range(5) for i in range(n)], 5)
    assert an.sampled_comparison(_ev([0] * n, [0] * 25, 5), steered).wilcoxon_p == pytest.approx(2 / 32)
    assert an.sampled_comparison(base, base).wilcoxon_p == 1.0
    assert an.sampled_comparison(base, _ev([0] * n))is None  # greedy only: no sampled comparison


def test_changed_answers_count_both_directions_and_use_exact_mcnemar():
    before = [0] * 14 + [1] * 4 + [1] * 5 + [0] * 2
    after = [1] * 14 + [0] * 4 + [1] * 5 + [0] * 2
    c = an.changed_answers(before, after)
    assert (c.wrong_to_right, c.right_to_wrong, c.net, c.n) == (14, 4, 10, 25)
    assert c.mcnemar_p == pytest.approx(2 * sum(__import__("math").comb(18, i) for i in range(5)) / 2**18)


def test_prefix_summary_compares_the_prefix_with_its_own_vector():
    base, vec, pre = _ev([0, 0, 1, 1, 0]), _ev([1, 1, 1, 0, 0]), _ev([1, 0, 0, 1, 1])
    s = an.prefix_summary("To", 28, base, vec, pre)
    assert s.layer == 28 and s.token == "To"
    assert s.gain_vector == pytest.approx(0.2) and s.gain_prefix == pytest.approx(0.2)
    assert s.ratio == pytest.approx(1.0)
    assert (s.prefix_vs_base.wrong_to_right, s.prefix_vs_base.right_to_wrong) == (2, 1)
    assert (s.vector_vs_base.wrong_to_right, s.vector_vs_base.right_to_wrong) == (2, 1)
    assert (s.prefix_vs_vector.wrong_to_right, s.prefix_vs_vector.right_to_wrong) == (2, 2)


def test_family_holm_corrects_every_paired_comparison_of_a_run():
    base = _ev([0] * 20)
    evals = {"base": base, "L28": _ev([1] * 6 + [0] * 14), "random L28": _ev([0] * 20)}
    gate = rc.GateSummary(28, 0, 0.0, 0.0, 0.0, rc.Accuracy(0.0, (0, 1), 20), rc.Comparison((0.1, 0, 0), 0.2),
                          rc.Comparison((0.3, 0, 0), 0.01), {}, 0, [])
    res = rc.Findings(prefix=rc.PrefixRecord([an.prefix_summary("8", 28, base, evals["L28"], _ev([1] * 2 + [0] * 18))]),
                      gate=gate)
    fam = family(evals, res)
    names = [r.name for r in fam.rows]
    assert names == ["L28 vs base (greedy)", "random L28 vs base (greedy)", "prefix '8' vs L28 vector (greedy)",
                     "gated vector vs_plain (greedy)", "gated vector vs_base (greedy)"]
    ps = [r.p for r in fam.rows]
    assert ps[0] == pytest.approx(2 / 2**6) and ps[1] == 1.0 and ps[2] == pytest.approx(2 / 2**4)
    assert [r.p_holm for r in fam.rows] == pytest.approx(stats.holm(ps))
    # by hand: sorted 0.01, 0.03125, 0.125, 0.2, 1 -> x5, x4, x3, x2, x1 = 0.05, 0.125, 0.375, 0.4, 1
    assert fam.rows[4].p_holm == pytest.approx(0.05) and fam.rows[4].verdict == "no significant difference"
    assert fam.rows[0].p_holm == pytest.approx(0.125) and fam.rows[2].p_holm == pytest.approx(0.375)
    assert fam.m == 5
    assert [r.n for r in fam.rows] == [20] * 5  # every row pairs the 20 problems (the gate's rows said 0 before)
    assert family(evals, res, alpha=0.2).rows[0].verdict == "difference"


def test_transfer_names_the_lora_fine_tune():
    rel = transfer.relation("smollm2-135m", "smollm2-135m-safe")
    assert "LoRA fine-tune of smollm2-135m" in rel and "not a separately trained" in rel
    assert "not recorded" in transfer.relation("a", "some/other-model")


@pytest.mark.parametrize("difficulty", sorted(MULTI_STEP))
def test_multi_step_problems_are_correct_deterministic_and_plentiful(difficulty):
    _, test = split(50, 200, difficulty, seed=0)
    assert len({p.question for p in test}) == 200 and test == split(50, 200, difficulty, seed=0)[1]
    n_ops, top, losses = MULTI_STEP[difficulty]
    for p in test:  # recompute each answer from the text
        nums = [int(x) for x in re.findall(r"\d+", p.question)]
        assert len(nums) == n_ops + 1 and all(1 <= x <= top for x in nums[1:])
        amount = nums[0]
        for sentence, x in zip(p.question.split(". ")[1:], nums[1:]):
            lose = any(w in sentence for w in ("gives", "loses", "sells", "uses"))
            assert losses or not lose
            amount += -x if lose else x
            assert amount >= 0
        assert str(amount) == p.answer
    assert make_problems(5, difficulty, seed=1) == make_problems(5, difficulty, seed=1)


def test_config_layer_sweep_and_joint_pairs_option():
    assert ReasoningConfig(layers=("every:10",)).resolve_layers(30) == [0, 10, 20]
    assert ReasoningConfig(layers=("every", "-1")).resolve_layers(4) == [0, 1, 2, 3]
    assert ReasoningConfig().eval_samples >= 8 and ReasoningConfig(joint_pairs=True).joint_pairs
    with pytest.raises(SteerscopeError):
        ReasoningConfig(layers=("every:x",)).resolve_layers(30)


@pytest.mark.parametrize("difficulty", sorted(set(DIFFICULTIES) - {"add-1d"}) + ["add-1d"])
def test_worked_solutions_reach_the_answer_step_by_step(difficulty):
    """Few-shot turns (issue 25's band task): each worked solution is graded correct, and a multi-step one
    recomputes every step on its own line; the examples are disjoint from the train and test problems."""
    from steerscope.metrics.math import is_correct

    for p in make_problems(60, difficulty, seed=3):
        sol = worked(p)
        assert is_correct(sol, p.answer) and sol.endswith(f"\\boxed{{{p.answer}}}.")
        if difficulty in MULTI_STEP:
            steps = re.findall(r"(\d+) ([-+]) (\d+) = (\d+)\.", sol)
            assert len(steps) == MULTI_STEP[difficulty][0]
            assert all(int(a) + (1 if op == "+" else -1) * int(b) == int(c) for a, op, b, c in steps)
            assert steps[-1][3] == p.answer
    train, test = split(50, 40, difficulty, seed=0)
    shots = examples(3, difficulty, 0, {p.question for p in [*train, *test]})
    assert len(shots) == 3 and not {q for q, _ in shots} & {p.prompt for p in [*train, *test]}
    with pytest.raises(SteerscopeError, match="cannot work out"):
        worked(Problem("Tom has 3 coins. Tom loses 1. How many coins does Tom have now?", "5"))


def test_format_chat_puts_the_history_turns_before_the_prompt(smol_tokenizer, tiny_llama):
    history = [("What is 1 + 1?", "1 + 1 = 2."), ("What is 2 + 2?", "2 + 2 = 4.")]
    text = tiny_llama.format_chat("What is 3 + 3?", history=history)
    order = [text.index(s) for s in ("What is 1 + 1?", "1 + 1 = 2.", "What is 2 + 2?", "2 + 2 = 4.", "What is 3 + 3?")]
    assert order == sorted(order) and text.count("<|im_start|>assistant") == 3 and text.endswith("assistant\n")
    assert tiny_llama.format_chat("Hi") == tiny_llama.format_chat("Hi", history=())
    from dataclasses import replace as dc_replace

    raw = dc_replace(tiny_llama, tokenizer=copy.copy(smol_tokenizer))
    raw.tokenizer.chat_template = None
    assert not raw.has_chat_template  # no template: plain text turns
    assert raw.format_chat("Q3", history=[("Q1", "A1")]) == "Q1\nA1\n\nQ3"


def test_shots_reach_training_and_evaluation_and_keep_old_run_folders(tiny_llama):
    from steerscope.studies.reasoning import steps as st

    cfg = ReasoningConfig(difficulty="multi-2-tiny", shots=2, n_train=20, n_test=10)
    shots = st.shots(cfg)
    assert len(shots) == 2 and st._rloo_cfg(cfg, 0.1).history == shots
    texts = st.chat_texts(tiny_llama, cfg, st.problems(cfg)[1])
    assert all(t.index(shots[1][1]) < t.index(p.question) for t, p in zip(texts, st.problems(cfg)[1]))
    assert st.shots(ReasoningConfig()) == () and st._rloo_cfg(ReasoningConfig(), 0.1).history == ()
    # identity: the defaults leave the keys out, so a run folder written before the options existed resumes
    base = ReasoningConfig().identity()
    assert "shots" not in base and "pair_layers" not in base
    assert ReasoningConfig(shots=2).identity()["shots"] == 2
    assert ReasoningConfig(pair_layers=("-2", "-1")).identity()["pair_layers"] == ["-2", "-1"]


def test_pair_layers_pick_the_pairs_among_the_single_layers():
    cfg = ReasoningConfig(layers=("every:6", "-2", "-1"), pair_layers=("-2", "-1"))
    assert cfg.resolve_layers(30) == [0, 6, 12, 18, 24, 28, 29] and cfg.resolve_pair_layers(30) == [28, 29]
    assert ReasoningConfig(layers=("0", "5")).resolve_pair_layers(30) == [0, 5]
    with pytest.raises(SteerscopeError, match="not among the single layers"):
        ReasoningConfig(layers=("every:6",), pair_layers=("-1",)).resolve_pair_layers(30)
