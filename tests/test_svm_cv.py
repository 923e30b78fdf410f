"""SVM evaluation against direct scikit-learn cross-validation, on real MUTAG features."""
import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.svm import SVC

from cldro_jax.data.graph_batch import GraphBudget, pack_graphs
from cldro_jax.data.tu_dataset import load_tu_dataset
from cldro_jax.evaluators.svm_cv import (DEFAULT_C_GRID, SvmCvEvaluator, mean_std_over_seeds,
                                         svm_cv_accuracy, svm_cv_accuracy_over_seeds,
                                         svm_cv_fold_results)


@pytest.fixture(scope="module")
def mutag_histograms():
    """Fixed features of the real MUTAG graphs: per-graph node-label counts (7-d)."""
    data = load_tu_dataset("MUTAG", source="grakel")
    return np.stack([g.node_features.sum(0) for g in data.graphs]), data.labels


@pytest.fixture(scope="module")
def seed4_result(mutag_histograms):
    return svm_cv_accuracy(*mutag_histograms, seed=4)


def test_the_c_grid_is_graphcls():
    # LOSSES.md: "SVC with C in {1e-3..1e3}", written out (the tests below use the module's grid)
    assert DEFAULT_C_GRID == (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


def test_equals_cross_val_score_with_grid_search(mutag_histograms, seed4_result):
    x, y = mutag_histograms
    mean, std = seed4_result
    reference = cross_val_score(
        GridSearchCV(SVC(), {"C": list(DEFAULT_C_GRID)}, cv=5, scoring="accuracy"), x, y,
        cv=StratifiedKFold(n_splits=10, shuffle=True, random_state=4), scoring="accuracy")
    assert mean == pytest.approx(reference.mean(), abs=1e-12)
    assert std == pytest.approx(reference.std(), abs=1e-12)
    # Label histograms separate MUTAG's classes well above the 66.5% majority rate.
    assert 0.75 < mean < 0.95


def test_a_progress_callback_sees_every_outer_fold_and_changes_nothing(mutag_histograms,
                                                                        seed4_result):
    calls = []
    result = svm_cv_accuracy(*mutag_histograms, seed=4, folds=10,
                             on_fold=lambda: calls.append(1))
    assert len(calls) == 10 and result == seed4_result


def test_inner_cv_picks_c_like_a_hand_written_search(mutag_histograms):
    x, y = mutag_histograms
    folds = svm_cv_fold_results(x, y, seed=1, folds=10)
    train, test = next(StratifiedKFold(10, shuffle=True, random_state=1).split(x, y))
    xt, yt = x[train], y[train]
    inner_scores = []
    for c in DEFAULT_C_GRID:  # unshuffled stratified 5-fold on the outer training part
        scores = [SVC(C=c).fit(xt[a], yt[a]).score(xt[b], yt[b])
                  for a, b in StratifiedKFold(5).split(xt, yt)]
        inner_scores.append(np.mean(scores))
    best_c = DEFAULT_C_GRID[int(np.argmax(inner_scores))]  # first best, like GridSearchCV
    assert folds[0]["C"] == best_c
    expected = np.mean(SVC(C=best_c).fit(xt, yt).predict(x[test]) == y[test])
    assert folds[0]["accuracy"] == pytest.approx(expected)


def test_over_seeds_and_summary(mutag_histograms):
    x, y = mutag_histograms
    x, y = x[::3], y[::3]  # 63 graphs keep this fast
    kwargs = dict(folds=3, inner_folds=3, c_grid=(0.1, 1.0, 10.0))
    per_seed = [svm_cv_accuracy(x + 0.1 * s, y, seed=s, **kwargs)[0] for s in (0, 1, 2)]
    mean, std = svm_cv_accuracy_over_seeds([x, x + 0.1, x + 0.2], y, [0, 1, 2], **kwargs)
    assert mean == pytest.approx(np.mean(per_seed)) and std == pytest.approx(np.std(per_seed))
    assert mean_std_over_seeds([0.8, 0.9, 0.7]) == pytest.approx((0.8, np.std([0.8, 0.9, 0.7])))


def test_bad_inputs_raise(mutag_histograms):
    x, y = mutag_histograms
    with pytest.raises(ValueError, match="need embeddings"):
        svm_cv_accuracy(x[:-1], y, seed=0)
    with pytest.raises(ValueError, match="NaN"):
        svm_cv_accuracy(np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), y, seed=0)
    with pytest.raises(ValueError, match=r"the classes \[3\]: an SVM classifier needs at least 2"):
        svm_cv_accuracy(np.ones((20, 4)), np.full(20, 3), seed=0)
    with pytest.raises(ValueError, match="every class has fewer than 10 examples"):
        svm_cv_accuracy(x[:12], np.r_[np.zeros(6, int), np.ones(6, int)], seed=0)
    # One class smaller than the folds: scored with a warning, as scikit-learn (the reference).
    with pytest.warns(UserWarning, match="least populated class"):
        mean, _ = svm_cv_accuracy(x[:20], np.r_[np.zeros(15, int), np.ones(5, int)], seed=0)
    assert 0.0 <= mean <= 1.0
    with pytest.raises(ValueError, match="seeds"):
        svm_cv_accuracy_over_seeds([x], y, [0, 1])
    with pytest.raises(ValueError):
        mean_std_over_seeds([])


def test_evaluator_uses_only_real_graph_slots(seed4_result):
    data = load_tu_dataset("MUTAG", source="grakel")
    budget = GraphBudget(2600, 6000, 128)
    batches = [pack_graphs(data.graphs[i:i + 128], budget) for i in (0, 128)]

    def embed_fn(variables, batch):  # label histogram per graph slot, padding slots junk
        sums = np.zeros((batch.graph_mask.shape[0], batch.node_features.shape[1]))
        np.add.at(sums, batch.node_graph, batch.node_features * batch.node_mask[:, None])
        return np.where(batch.graph_mask[:, None], sums, 1e6) * variables

    evaluator = SvmCvEvaluator(embed_fn, batches, seed=4)
    np.testing.assert_array_equal(evaluator.labels, data.labels)
    results = dict(evaluator.run(1.0))
    assert results["svm_cv_accuracy"] == pytest.approx(seed4_result[0])
    assert set(results) == {"svm_cv_accuracy", "svm_cv_accuracy_std"}
