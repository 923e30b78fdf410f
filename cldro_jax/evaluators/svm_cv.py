"""SVM cross-validation accuracy of frozen graph embeddings (GraphCL's unsupervised TU protocol).

The protocol of the reference (GraphCL ``evaluate_embedding.py``, ``svc_classify(x, y,
search=True)``), which the ADNCE graph code calls:
- embeddings of the ORIGINAL graphs, used as they are (no scaling);
- outer ``StratifiedKFold(10, shuffle=True)``; in each fold ``GridSearchCV(SVC(), {"C": [1e-3,
  ..., 1e3]}, cv=5, scoring="accuracy")`` fitted on the training part, i.e. an RBF-kernel SVC
  (scikit-learn defaults, gamma="scale") with C chosen by an inner 5-fold stratified CV
  (unshuffled, scikit-learn's default for an integer cv), refitted on the whole training part;
- the result is the mean test accuracy over the 10 folds. (The reference shuffles with
  ``random_state=None``; here the shuffle is seeded so results reproduce.)
The paper reports mean +- std of that accuracy over 5 training seeds: `mean_std_over_seeds`.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from absl import logging

DEFAULT_C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)


def _check_inputs(embeddings: np.ndarray, labels: np.ndarray, folds: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"need embeddings (n, d) and labels (n,), got {x.shape} and {y.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("embeddings contain NaN or inf (diverged training?)")
    class_sizes = np.bincount(np.unique(y, return_inverse=True)[1])
    if class_sizes.size < 2:
        raise ValueError(f"the labels hold the classes {np.unique(y).tolist()}: an SVM classifier "
                         "needs at least 2 (check the dataset's graph labels)")
    if class_sizes.max() < folds:
        raise ValueError(f"every class has fewer than {folds} examples (the largest "
                         f"{class_sizes.max()}): stratified {folds}-fold CV needs at least {folds} "
                         "in some class")
    if class_sizes.min() < folds:
        # scikit-learn's StratifiedKFold (the reference's) only warns here and scores the data:
        # some folds lack that class. Do the same, and say so.
        logging.warning("the smallest class has %d examples, fewer than the %d folds: some test "
                        "folds hold none of it (scikit-learn's StratifiedKFold behaviour, as the "
                        "reference)", class_sizes.min(), folds)
    return x, y


def svm_cv_fold_results(embeddings: np.ndarray, labels: np.ndarray, *, seed: int, folds: int = 10,
                        inner_folds: int = 5, c_grid: Sequence[float] = DEFAULT_C_GRID,
                        n_jobs: int | None = None,
                        on_fold: Callable[[], object] | None = None) -> list[dict]:
    """Per outer fold: {"accuracy": test accuracy, "C": the C chosen by the inner CV}.

    `on_fold` is called after each outer fold (a progress bar's update)."""
    # Imported here: training (and the benchmarks, on a bare GPU image) never needs scikit-learn.
    from sklearn.model_selection import GridSearchCV, StratifiedKFold  # pylint: disable=import-outside-toplevel
    from sklearn.svm import SVC  # pylint: disable=import-outside-toplevel

    x, y = _check_inputs(embeddings, labels, folds)
    outer = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    results = []
    for train_index, test_index in outer.split(x, y):
        search = GridSearchCV(SVC(), {"C": list(c_grid)}, cv=inner_folds, scoring="accuracy",
                              n_jobs=n_jobs)
        search.fit(x[train_index], y[train_index])
        accuracy = float(np.mean(search.predict(x[test_index]) == y[test_index]))
        results.append({"accuracy": accuracy, "C": float(search.best_params_["C"])})
        if on_fold is not None:
            on_fold()
    return results


def svm_cv_accuracy(embeddings: np.ndarray, labels: np.ndarray, *, seed: int, folds: int = 10,
                    inner_folds: int = 5, c_grid: Sequence[float] = DEFAULT_C_GRID,
                    n_jobs: int | None = None,
                    on_fold: Callable[[], object] | None = None) -> tuple[float, float]:
    """(mean, std) over the outer folds of the SVC test accuracy (see the module docstring)."""
    accuracies = [r["accuracy"] for r in svm_cv_fold_results(
        embeddings, labels, seed=seed, folds=folds, inner_folds=inner_folds, c_grid=c_grid,
        n_jobs=n_jobs, on_fold=on_fold)]
    return float(np.mean(accuracies)), float(np.std(accuracies))


def mean_std_over_seeds(values: Iterable[float]) -> tuple[float, float]:
    """Mean and population std (ddof=0, numpy's default) of per-seed results."""
    values = np.asarray(list(values), dtype=np.float64)
    if values.size == 0:
        raise ValueError("mean_std_over_seeds needs at least one value")
    return float(values.mean()), float(values.std())


def svm_cv_accuracy_over_seeds(embeddings_per_seed: Sequence[np.ndarray], labels: np.ndarray,
                               seeds: Sequence[int], **kwargs) -> tuple[float, float]:
    """The paper's report: one `svm_cv_accuracy` mean per training seed (the embeddings of the
    model trained with that seed; the CV shuffle seeded with it), then mean +- std over seeds."""
    if len(embeddings_per_seed) != len(seeds):
        raise ValueError(f"{len(embeddings_per_seed)} embedding sets for {len(seeds)} seeds")
    return mean_std_over_seeds(
        svm_cv_accuracy(e, labels, seed=s, **kwargs)[0] for e, s in zip(embeddings_per_seed, seeds))


class SvmCvEvaluator:
    """big_vision-style evaluator: ``run(variables)`` yields ("svm_cv_accuracy", mean) and
    ("svm_cv_accuracy_std", std over folds).

    Args:
      embed_fn: ``embed_fn(variables, batch) -> (G, d)`` graph embeddings (e.g. a jitted
        ``lambda v, b: model.apply(v, b, train=False)[0]``).
      batches: the evaluation batches of the ORIGINAL graphs (`cldro_jax.data.graphs.eval_batches`);
        materialised once. Real graphs are those with ``graph_mask``; their labels come from
        ``batch.labels``.
      seed: CV shuffle seed.
    """

    def __init__(self, embed_fn: Callable, batches: Iterable, *, seed: int, **cv_kwargs):
        self.embed_fn = embed_fn
        self.batches = list(batches)
        self.seed = seed
        self.cv_kwargs = cv_kwargs
        self.labels = np.concatenate([np.asarray(b.labels)[np.asarray(b.graph_mask)]
                                      for b in self.batches])

    def embeddings(self, variables) -> np.ndarray:
        return np.concatenate([np.asarray(self.embed_fn(variables, b))[np.asarray(b.graph_mask)]
                               for b in self.batches])

    def run(self, variables) -> Iterator[tuple[str, float]]:
        mean, std = svm_cv_accuracy(self.embeddings(variables), self.labels, seed=self.seed,
                                    **self.cv_kwargs)
        yield "svm_cv_accuracy", mean
        yield "svm_cv_accuracy_std", std
