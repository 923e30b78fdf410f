"""Weighted k-nearest-neighbour monitor on frozen features (the image reference's kNN test).

The reference (Wu et al. 2023, image code, following Wu et al. 2018 "instance discrimination")
classifies a test image by its k = 200 most similar train images:

    s_qn    = cos(f_q, f_n)                      features L2-normalised, bank = train split
    N_k(q)  = the k bank items with the largest s_qn
    score_c = sum_{n in N_k(q), y_n = c} exp(s_qn / t)
    pred    = argmax_c score_c                   top-5: the 5 largest scores

with t the training temperature. Everything here is a pure function of arrays; feature
extraction (with a padding mask) lives in `cldro_jax.evaluators.linear_probe.extract_features`.

Conventions (documented because the reference leaves them to torch's internals):
- k larger than the bank is clamped to the bank size (every bank item votes).
- Ties between bank items at the k-th similarity: the lower bank index is kept
  (`lax.top_k` semantics). Ties between class scores (e.g. several classes with no
  neighbour, score 0): the lower class index ranks first. torch's `topk`/`argsort` leave
  ties unspecified, so on exact ties the reference may differ; with real features exact
  float ties essentially never occur.
- With fewer than 5 classes, top-5 accuracy uses all classes (and is therefore 100%), as the
  reference's `pred_labels[:, :5]` slice does.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["knn_classify", "knn_accuracy", "ranked_classes", "l2_normalize"]

# Norm floor of torch.nn.functional.normalize: an all-zero feature stays zero instead of NaN.
_NORM_EPS = 1e-12


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """Rows scaled to unit L2 norm (zero rows stay zero), like `F.normalize`."""
    norm = jnp.linalg.norm(x, axis=axis, keepdims=True)
    return x / jnp.maximum(norm, _NORM_EPS)


def _concrete(x: Any) -> np.ndarray | None:
    """The value of `x` as NumPy when it is known at trace time, else None (under jit)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_finite(name: str, features: Any, rows: Any = None) -> None:
    """Refuses NaN/inf features (of the `rows` marked True, default all) known at trace time:
    they would score an accuracy anyway (a NaN row's neighbours and argmax are arbitrary). One
    reduction on the device and one scalar read, not a copy of the features to the host."""
    if isinstance(features, jax.core.Tracer) or jnp.ndim(features) < 1:
        return   # traced: unknown yet; a scalar: the shape checks name it
    finite = jnp.isfinite(jnp.asarray(features)).reshape(np.shape(features)[0], -1).all(axis=1)
    if rows is not None:
        finite = finite | ~jnp.asarray(rows, bool)
    if not bool(jnp.all(finite)):
        raise ValueError(f"{name} contain NaN or inf, so no accuracy can be computed from them "
                         "(a diverged encoder? check the run's loss in metrics.jsonl).")


def _check_labels(name: str, labels: Any, num_classes: int) -> None:
    values = _concrete(labels)
    if values is None or values.size == 0:
        return
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{name} must be integer class ids, got dtype {values.dtype}; "
                         f"cast with `.astype(np.int32)`.")
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{name} must lie in [0, num_classes={num_classes}), found values in "
                         f"[{lo}, {hi}]; pass the dataset's number of classes as num_classes.")


def _check_inputs(bank_features, bank_labels, query_features, *, num_classes, k, temperature,
                  chunk_size) -> None:
    """Shape/argument checks; shapes are static, so they run under jit too."""
    if jnp.ndim(bank_features) != 2 or jnp.ndim(query_features) != 2:
        raise ValueError("bank_features and query_features must be 2-D (num_items, feature_dim), "
                         f"got shapes {jnp.shape(bank_features)} and {jnp.shape(query_features)}; "
                         "flatten the encoder output first.")
    num_bank, dim = jnp.shape(bank_features)
    if jnp.shape(query_features)[1] != dim:
        raise ValueError(f"feature dims differ: bank {dim}, query {jnp.shape(query_features)[1]}; "
                         "both must come from the same encoder output.")
    if num_bank == 0:
        raise ValueError("the feature bank is empty; extract features of the train split first.")
    if jnp.shape(bank_labels) != (num_bank,):
        raise ValueError(f"bank_labels must have shape ({num_bank},), got {jnp.shape(bank_labels)}.")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k} (the reference uses k=200).")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    t = _concrete(temperature)
    if t is not None and not float(t) > 0:
        raise ValueError(f"temperature must be > 0, got {float(t)} (the reference uses the "
                         "training temperature, e.g. 0.4 for CIFAR10).")
    _check_labels("bank_labels", bank_labels, int(num_classes))


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "chunk_size"))
def _knn_scores(bank_features, bank_labels, query_features, temperature, *, num_classes, k,
                chunk_size):
    bank = l2_normalize(bank_features.astype(jnp.float32))
    queries = l2_normalize(query_features.astype(jnp.float32))
    bank_labels = bank_labels.astype(jnp.int32)
    num_queries = queries.shape[0]
    k = min(k, bank.shape[0])  # k > bank size: every bank item votes.
    if num_queries == 0:  # e.g. an empty process-local shard; the chunking below divides by 0
        return jnp.zeros((0, num_classes), jnp.float32)

    # Queries are processed chunk by chunk (lax.map runs them sequentially), so the live
    # similarity matrix is (chunk_size, bank size): ~100 MB for 256 x 100k in float32.
    chunk = min(chunk_size, num_queries)
    num_chunks = -(-num_queries // chunk)
    padded = jnp.pad(queries, ((0, num_chunks * chunk - num_queries), (0, 0)))

    def chunk_scores(q):
        # HIGHEST: on GPUs the default f32 matmul may run in TF32 (10-bit mantissa), which
        # reorders near neighbours; this matmul is a negligible cost next to training.
        sims = jnp.matmul(q, bank.T, precision=jax.lax.Precision.HIGHEST)
        top_sims, top_idx = jax.lax.top_k(sims, k)
        weights = jnp.exp(top_sims / temperature)
        votes = bank_labels[top_idx]
        # Scatter-add the weights into (chunk, C): memory chunk*C rather than the reference's
        # (chunk*k, C) one-hot, which matters for 1000 classes.
        rows = jnp.broadcast_to(jnp.arange(q.shape[0])[:, None], votes.shape)
        return jnp.zeros((q.shape[0], num_classes), jnp.float32).at[rows, votes].add(weights)

    scores = jax.lax.map(chunk_scores, padded.reshape(num_chunks, chunk, -1))
    return scores.reshape(num_chunks * chunk, num_classes)[:num_queries]


def knn_classify(bank_features: jax.Array, bank_labels: jax.Array, query_features: jax.Array, *,
                 num_classes: int, k: int = 200, temperature: float,
                 chunk_size: int = 256) -> jax.Array:
    """Weighted-kNN class scores of each query against a labelled feature bank.

    Args:
      bank_features: (N, D) features of the train split (normalised here; any scale works).
      bank_labels: (N,) integer class ids in [0, num_classes).
      query_features: (Q, D) features to classify.
      num_classes: number of classes C (static).
      k: neighbours per query (static); clamped to N when larger.
      temperature: t in the vote weight exp(cos / t); must be > 0. In float32 the weight
        overflows for t below ~1/88, far under any temperature used in practice.
      chunk_size: queries per chunk (static); memory is O(chunk_size * N). Q need not be a
        multiple of it.

    Returns:
      (Q, C) float32 scores: the sum of exp(cos/t) over each class's neighbours (0 for a
      class without neighbours). Jit-compiled; callable inside another jit.
    """
    _check_inputs(bank_features, bank_labels, query_features, num_classes=num_classes, k=k,
                  temperature=temperature, chunk_size=chunk_size)
    return _knn_scores(jnp.asarray(bank_features), jnp.asarray(bank_labels),
                       jnp.asarray(query_features), jnp.asarray(temperature, jnp.float32),
                       num_classes=int(num_classes), k=int(k), chunk_size=int(chunk_size))


def ranked_classes(scores: jax.Array, top: int = 5) -> jax.Array:
    """(Q, min(top, C)) class ids by decreasing score; ties -> lower class id first."""
    return jax.lax.top_k(scores, min(top, scores.shape[-1]))[1]


def knn_accuracy(bank_features: jax.Array, bank_labels: jax.Array, query_features: jax.Array,
                 query_labels: jax.Array, *, num_classes: int, k: int = 200, temperature: float,
                 query_mask: jax.Array | None = None, chunk_size: int = 256) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of the weighted kNN classifier, as the reference reports it.

    `query_mask` (Q,) marks real queries (True/1) against padding rows (False/0) of a padded
    eval set; padding rows are excluded from both numerator and denominator. Returns Python
    floats `{"top1": ..., "top5": ...}` (this is the end of the evaluation, a host sync is due).
    """
    if jnp.ndim(query_features) != 2:
        raise ValueError(f"query_features must be 2-D (num_queries, feature_dim), got shape "
                         f"{jnp.shape(query_features)}; flatten the encoder output first.")
    num_queries = jnp.shape(query_features)[0]
    if jnp.shape(query_labels) != (num_queries,):
        raise ValueError(f"query_labels must have shape ({num_queries},), got "
                         f"{jnp.shape(query_labels)}.")
    if query_mask is None:
        query_mask = np.ones((num_queries,), bool)
    if jnp.shape(query_mask) != (num_queries,):
        raise ValueError(f"query_mask must have shape ({num_queries},), got {jnp.shape(query_mask)}.")
    mask = np.asarray(query_mask).astype(bool)
    if not mask.any():
        raise ValueError("query_mask selects no query; the accuracy of an empty set is undefined.")
    # Padding rows may carry any label (often -1); only real rows must be valid class ids.
    _check_labels("query_labels", np.asarray(query_labels)[mask], int(num_classes))
    # To the device once (host features are copied there here, not again by knn_classify).
    bank_features, query_features = jnp.asarray(bank_features), jnp.asarray(query_features)
    check_finite("bank_features", bank_features)
    check_finite("query_features", query_features, mask)

    scores = knn_classify(bank_features, bank_labels, query_features, num_classes=num_classes,
                          k=k, temperature=temperature, chunk_size=chunk_size)
    ranked = ranked_classes(scores, 5)
    hits = ranked == jnp.asarray(query_labels, jnp.int32)[:, None]
    mask = jnp.asarray(mask)
    count = mask.sum()
    top1 = jnp.sum(hits[:, 0] & mask) / count * 100.0
    top5 = jnp.sum(hits.any(axis=1) & mask) / count * 100.0
    return {"top1": float(top1), "top5": float(top5)}
