"""Weighted kNN monitor against a float64 NumPy transcription of the reference and scikit-learn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from cldro_jax.evaluators import knn


def reference_knn(bank, bank_labels, queries, num_classes, k, temperature):
    """Float64 transcription of the reference `test()`: scores (Q, C) and ranked classes.

    Ties are broken by a stable sort (lower index first), the convention knn.py documents.
    """
    bank = np.asarray(bank, np.float64)
    queries = np.asarray(queries, np.float64)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    sims = queries @ bank.T
    top_idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top_sims = np.take_along_axis(sims, top_idx, axis=1)
    weights = np.exp(top_sims / temperature)
    votes = np.asarray(bank_labels)[top_idx]
    one_hot = np.zeros((votes.size, num_classes))
    one_hot[np.arange(votes.size), votes.ravel()] = 1.0
    scores = (one_hot.reshape(*votes.shape, num_classes) * weights[..., None]).sum(axis=1)
    ranked = np.argsort(-scores, axis=1, kind="stable")
    return scores, ranked


def clustered_data(seed, num_bank, num_query, dim, num_classes, noise):
    """Class-centred Gaussian features so that kNN accuracy is neither 0 nor 100%."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    bank_labels = rng.integers(0, num_classes, num_bank)
    query_labels = rng.integers(0, num_classes, num_query)
    bank = centres[bank_labels] + noise * rng.normal(size=(num_bank, dim))
    queries = centres[query_labels] + noise * rng.normal(size=(num_query, dim))
    return (bank.astype(np.float32), bank_labels.astype(np.int32), queries.astype(np.float32),
            query_labels.astype(np.int32))


def reference_accuracy(ranked, labels):
    top1 = (ranked[:, 0] == labels).mean() * 100
    top5 = (ranked[:, :5] == labels[:, None]).any(axis=1).mean() * 100
    return top1, top5


@pytest.mark.parametrize("chunk_size", [8, 37, 64, 256])
def test_scores_and_predictions_match_reference(chunk_size):
    bank, bank_y, queries, query_y = clustered_data(4, 300, 37, 16, 7, noise=2.5)
    k, t = 25, 0.1
    ref_scores, ref_ranked = reference_knn(bank, bank_y, queries, 7, k, t)
    # queries whose class ranks exactly 5th and some ranked lower: top-5 means five, not four
    assert (ref_ranked[:, 4] == query_y).any() and (ref_ranked[:, 5:] == query_y[:, None]).any()
    scores = np.asarray(knn.knn_classify(bank, bank_y, queries, num_classes=7, k=k,
                                         temperature=t, chunk_size=chunk_size))
    np.testing.assert_allclose(scores, ref_scores, rtol=2e-5, atol=1e-6)
    ranked = np.asarray(knn.ranked_classes(jnp.asarray(scores), 5))
    np.testing.assert_array_equal(ranked, ref_ranked[:, :5])

    acc = knn.knn_accuracy(bank, bank_y, queries, query_y, num_classes=7, k=k, temperature=t,
                           chunk_size=chunk_size)
    top1, top5 = reference_accuracy(ref_ranked, query_y)
    assert 20 < top1 < 100  # a non-trivial problem, so the agreement means something
    assert acc["top1"] == pytest.approx(top1, abs=1e-4)
    assert acc["top5"] == pytest.approx(top5, abs=1e-4)


def test_predictions_match_sklearn_weighted_knn():
    """scikit-learn's KNeighborsClassifier with the same vote weight as an independent check."""
    bank, bank_y, queries, query_y = clustered_data(1, 400, 60, 12, 5, noise=1.2)
    k, t = 30, 0.2
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    # On unit vectors ||a - b||^2 = 2 - 2 cos, so cos = 1 - d^2 / 2.
    clf = KNeighborsClassifier(n_neighbors=k, weights=lambda d: np.exp((1 - d**2 / 2) / t))
    clf.fit(unit(bank.astype(np.float64)), bank_y)
    sk_pred = clf.predict(unit(queries.astype(np.float64)))
    scores = knn.knn_classify(bank, bank_y, queries, num_classes=5, k=k, temperature=t)
    np.testing.assert_array_equal(np.asarray(scores).argmax(axis=1), sk_pred)
    acc = knn.knn_accuracy(bank, bank_y, queries, query_y, num_classes=5, k=k, temperature=t)
    assert acc["top1"] == pytest.approx((sk_pred == query_y).mean() * 100, abs=1e-4)


def test_query_mask_excludes_padding_rows():
    bank, bank_y, queries, query_y = clustered_data(2, 200, 45, 8, 6, noise=1.5)
    mask = np.ones(45, bool)
    mask[[3, 10, 11, 40, 44]] = False
    padded_y = query_y.copy()
    padded_y[~mask] = -1  # padding rows carry an invalid label; they must not be scored
    _, ref_ranked = reference_knn(bank, bank_y, queries[mask], 6, 20, 0.3)
    top1, top5 = reference_accuracy(ref_ranked, query_y[mask])
    acc = knn.knn_accuracy(bank, bank_y, queries, padded_y, num_classes=6, k=20, temperature=0.3,
                           query_mask=mask, chunk_size=16)
    assert acc["top1"] == pytest.approx(top1, abs=1e-4)
    assert acc["top5"] == pytest.approx(top5, abs=1e-4)
    unmasked = knn.knn_accuracy(bank, bank_y, queries[mask], query_y[mask], num_classes=6, k=20,
                                temperature=0.3)
    assert unmasked == pytest.approx(acc)


def test_k_larger_than_bank_is_clamped():
    bank, bank_y, queries, _ = clustered_data(3, 40, 9, 5, 4, noise=1.0)
    ref_scores, _ = reference_knn(bank, bank_y, queries, 4, 40, 0.5)
    scores = knn.knn_classify(bank, bank_y, queries, num_classes=4, k=200, temperature=0.5)
    np.testing.assert_allclose(np.asarray(scores), ref_scores, rtol=2e-5)
    # Every bank item votes: class totals equal the sum of all exp(cos/t) per class.
    assert np.asarray(scores).sum() == pytest.approx(ref_scores.sum(), rel=1e-5)


def test_separable_classes_give_full_accuracy():
    rng = np.random.default_rng(4)
    centres = np.eye(4, 32) * 10.0
    bank_y = np.repeat(np.arange(4), 50)
    query_y = np.tile(np.arange(4), 10)
    bank = centres[bank_y] + rng.normal(size=(200, 32))
    queries = centres[query_y] + rng.normal(size=(40, 32))
    acc = knn.knn_accuracy(bank, bank_y, queries, query_y, num_classes=4, k=200, temperature=0.1)
    assert acc == {"top1": 100.0, "top5": 100.0}


def test_fewer_than_five_classes_and_ties_rank_lower_class_first():
    # One neighbour per query (k=1): the other classes tie at score 0 and rank by class id.
    bank = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    bank_y = np.array([2, 0, 1])
    queries = np.array([[1.0, 0.1], [-1.0, 0.1]], np.float32)
    scores = knn.knn_classify(bank, bank_y, queries, num_classes=3, k=1, temperature=0.5)
    np.testing.assert_array_equal(np.asarray(knn.ranked_classes(scores)), [[2, 0, 1], [1, 0, 2]])
    acc = knn.knn_accuracy(bank, bank_y, queries, np.array([0, 1]), num_classes=3, k=1,
                           temperature=0.5)
    assert acc == {"top1": 50.0, "top5": 100.0}


def test_runs_inside_jit_with_traced_temperature():
    bank, bank_y, queries, _ = clustered_data(5, 64, 10, 6, 3, noise=1.0)
    ref_scores, _ = reference_knn(bank, bank_y, queries, 3, 16, 0.25)
    jitted = jax.jit(lambda b, y, q, t: knn.knn_classify(b, y, q, num_classes=3, k=16,
                                                         temperature=t, chunk_size=4))
    np.testing.assert_allclose(np.asarray(jitted(bank, bank_y, queries, 0.25)), ref_scores,
                               rtol=2e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), "k must be >= 1"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(num_classes=2), "bank_labels must lie in"),
    (dict(query=np.zeros((3, 4), np.float32)), "feature dims differ"),
    (dict(bank=np.zeros((0, 5), np.float32), labels=np.zeros((0,), np.int32)), "bank is empty"),
    (dict(labels=np.zeros((7,), np.int32)), "bank_labels must have shape"),
    (dict(labels=np.zeros((10,), np.float32)), "integer class ids"),
])
def test_bad_input_raises_clear_error(kwargs, message):
    args = dict(bank=np.ones((10, 5), np.float32), labels=np.arange(10) % 3,
                query=np.ones((3, 5), np.float32), k=4, temperature=0.5, num_classes=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        knn.knn_classify(args["bank"], args["labels"], args["query"], num_classes=args["num_classes"],
                         k=args["k"], temperature=args["temperature"])


def test_accuracy_rejects_empty_mask_and_bad_query_labels():
    bank, bank_y, queries, query_y = clustered_data(6, 20, 4, 3, 2, noise=1.0)
    with pytest.raises(ValueError, match="selects no query"):
        knn.knn_accuracy(bank, bank_y, queries, query_y, num_classes=2, temperature=0.5,
                         query_mask=np.zeros(4, bool))
    with pytest.raises(ValueError, match="query_features must be 2-D"):
        knn.knn_accuracy(bank, bank_y, queries[0], query_y, num_classes=2, temperature=0.5)
    with pytest.raises(ValueError, match="query_labels must lie in"):
        knn.knn_accuracy(bank, bank_y, queries, query_y + 5, num_classes=2, temperature=0.5)
    # NaN features (a diverged encoder) scored 25 / 100 before: refused, on either side; a NaN
    # padding row (query_mask False) is not a real query and is fine.
    bad = np.array(queries, np.float32)
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="query_features contain NaN or inf"):
        knn.knn_accuracy(bank, bank_y, bad, query_y, num_classes=2, temperature=0.5)
    with pytest.raises(ValueError, match="bank_features contain NaN or inf"):
        knn.knn_accuracy(np.where(True, np.inf, bank), bank_y, queries, query_y, num_classes=2,
                         temperature=0.5)
    mask = np.ones(4, bool)
    mask[1] = False
    knn.knn_accuracy(bank, bank_y, bad, query_y, num_classes=2, temperature=0.5, query_mask=mask)
