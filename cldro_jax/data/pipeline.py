"""Host input pipeline: deterministic, resumable batches from any random-access source.

A source is anything with ``len(source)`` and ``source[index_array] -> dict of numpy arrays``
whose leading axis is the index (the image, text and graph sources all qualify). Arrays stay as
the source gives them (uint8 images): conversion and augmentation happen on the accelerator.

Training order is a pure function of ``(seed, step)``: ``epoch = step // steps_per_epoch``, one
fresh permutation per epoch drawn from ``(seed, epoch)``, the last incomplete batch dropped. The
position to resume from is therefore just the step, and no iterator state needs checkpointing.
Each process reads only its contiguous slice of every global batch (rows ``[p * local,
(p + 1) * local)``), which is what ``jax.make_array_from_process_local_data`` expects when the
batch axis is sharded over processes in order.

Class-stratified batches (``classes_per_batch=k``, the sampling-bias experiment): each global
batch holds ``global_batch_size / k`` examples of each of ``k`` classes, both drawn at random from
``(seed, step)`` alone, so resume stays exact. A label-blind contrastive loss then sees about
``1/k`` of each anchor's negatives from its own class (false negatives), a share the experiment
controls; with 10 balanced classes and ``k = 0`` (uniform order) it is about 1/10.

Evaluation visits every example exactly once: the last global batch is padded to full size and
carries a boolean ``mask`` (False on padding rows, whose arrays are zeros), so metrics summed
over ``mask`` count each example once on any number of processes and devices.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

import numpy as np

Batch = dict[str, np.ndarray]

# How long a blocked producer waits before re-checking whether the consumer has gone.
_POLL_SECONDS = 0.1


class Subset:
    """The examples ``indices`` of ``source``, as a source of its own (e.g. a kNN bank limit)."""

    def __init__(self, source: Any, indices: Any):
        indices = np.asarray(indices)
        if indices.ndim != 1 or not (indices.size == 0 or np.issubdtype(indices.dtype, np.integer)):
            raise ValueError(f"Subset indices must be a 1-D integer array, got {indices.shape}")
        if indices.size and (indices.min() < 0 or indices.max() >= len(source)):
            raise IndexError(
                f"Subset indices span [{indices.min()}, {indices.max()}], outside the "
                f"{len(source)} examples of the source"
            )
        self.source = source
        self.indices = indices.astype(np.int64)

    def __len__(self) -> int:
        return self.indices.size

    def __getitem__(self, index: Any) -> Batch:
        index = np.asarray(index)
        if index.ndim != 1:
            raise ValueError(f"index a source with a 1-D integer array, got shape {index.shape}")
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"index out of range for a subset of {len(self)} examples")
        return self.source[self.indices[index]]

    def __getattr__(self, name: str) -> Any:
        # Dataset facts (e.g. image_shape) are those of the parent source.
        if name in ("source", "indices"):
            raise AttributeError(name)
        return getattr(self.source, name)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full global batches per epoch (the remainder is dropped)."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    steps = num_examples // global_batch_size
    if steps == 0:
        raise ValueError(
            f"global_batch_size={global_batch_size} exceeds the {num_examples} examples of the "
            "source: not one full batch per epoch. Lower the batch size or use more data"
        )
    return steps


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch, a function of (seed, epoch) only."""
    # SeedSequence mixes both integers, so neighbouring seeds/epochs give unrelated orders.
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))
    return rng.permutation(num_examples)


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index} and {process_count}"
        )
    return int(process_index), int(process_count)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """Rows each process reads per global batch."""
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by process_count="
            f"{process_count}; use a multiple of {process_count}"
        )
    return global_batch_size // process_count


def train_indices(
    num_examples: int,
    *,
    global_batch_size: int,
    seed: int,
    step: int,
    process_index: int,
    process_count: int,
    _cache: dict | None = None,
) -> np.ndarray:
    """Source indices this process reads at training ``step``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    per_epoch = steps_per_epoch(num_examples, global_batch_size)
    local = local_batch_size(global_batch_size, process_count)
    epoch, position = divmod(step, per_epoch)
    if _cache is not None and _cache.get("epoch") == epoch:
        order = _cache["order"]
    else:
        order = epoch_permutation(num_examples, seed, epoch)
        if _cache is not None:
            _cache.update(epoch=epoch, order=order)
    start = position * global_batch_size + process_index * local
    return order[start : start + local]


def source_labels(source: Any, *, chunk_size: int = 4096) -> np.ndarray:
    """The int label of every example of ``source`` (-1 = unlabelled), in index order.

    Uses the source's ``labels`` array when it has one (in-memory sources); otherwise reads the
    ``label`` entry in chunks (which also reads the images: lazy sources pay one pass).
    """
    if isinstance(source, Subset):  # checked first: a Subset forwards `labels` to its parent
        return source_labels(source.source, chunk_size=chunk_size)[source.indices]
    if getattr(source, "unlabeled", False):  # a whole unlabelled split: no need to decode it
        return np.full((len(source),), -1, np.int64)
    if getattr(source, "sources", None) is not None:  # a ConcatSource: part by part
        return np.concatenate([source_labels(part, chunk_size=chunk_size)
                               for part in source.sources])
    labels = getattr(source, "labels", None)
    if labels is None:
        parts = []
        for start in range(0, len(source), chunk_size):
            batch = source[np.arange(start, min(start + chunk_size, len(source)))]
            if "label" not in batch:
                raise ValueError(
                    "classes_per_batch needs labelled examples, but the source returns no "
                    f"'label' entry (entries: {sorted(batch)}); set classes_per_batch=0"
                )
            parts.append(np.asarray(batch["label"]))
        labels = np.concatenate(parts) if parts else np.zeros((0,), np.int64)
    labels = np.asarray(labels)
    if labels.shape != (len(source),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"source labels must be integers of shape ({len(source)},), got {labels.dtype} "
            f"{labels.shape}"
        )
    return labels


def class_pools(labels: np.ndarray) -> dict[int, np.ndarray]:
    """``{class: indices of its examples}`` over the labelled examples (label >= 0)."""
    labels = np.asarray(labels)
    classes = np.unique(labels[labels >= 0])
    return {int(c): np.flatnonzero(labels == c) for c in classes}


def check_classes_per_batch(
    pools: dict[int, np.ndarray], global_batch_size: int, classes_per_batch: int
) -> int:
    """Examples per class in each batch; raises ValueError when the request cannot be met."""
    k = classes_per_batch
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"classes_per_batch must be a positive int (0 = off), got {k!r}")
    if global_batch_size % k:
        raise ValueError(
            f"classes_per_batch={k} must divide the global batch size {global_batch_size}; "
            f"e.g. use --config.batch_size={global_batch_size // k * k or k}"
        )
    per_class = global_batch_size // k
    eligible = [c for c, idx in pools.items() if idx.size >= per_class]
    if len(eligible) < k:
        raise ValueError(
            f"classes_per_batch={k} with {per_class} examples per class needs {k} classes with "
            f"at least {per_class} labelled examples each; the source has {len(eligible)} such "
            f"classes (of {len(pools)} labelled classes). Lower classes_per_batch or the batch "
            "size, or use more data per class"
        )
    return per_class


def class_batch_indices(
    pools: dict[int, np.ndarray],
    *,
    global_batch_size: int,
    classes_per_batch: int,
    seed: int,
    step: int,
    process_index: int,
    process_count: int,
) -> np.ndarray:
    """Source indices this process reads at ``step`` of a class-stratified run.

    The global batch is ``classes_per_batch`` classes drawn uniformly without replacement (among
    classes with enough examples), then ``global_batch_size / classes_per_batch`` examples of
    each drawn uniformly without replacement, then shuffled so that every process and device
    slice mixes the classes. A pure function of ``(seed, step)``: no epoch state, exact resume.
    Over an "epoch" of ``N // B`` steps (N examples, K eligible classes, class c with n_c
    examples) an example of class c is drawn ``N / (K n_c)`` times in expectation: once when the
    classes are balanced, not exactly once.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    per_class = check_classes_per_batch(pools, global_batch_size, classes_per_batch)
    local = local_batch_size(global_batch_size, process_count)
    eligible = np.array(sorted(c for c, idx in pools.items() if idx.size >= per_class))
    # The trailing constant separates this stream from epoch_permutation's (seed, epoch) one.
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(step), 0xC1A55]))
    chosen = rng.choice(eligible, size=classes_per_batch, replace=False)
    rows = np.concatenate([rng.choice(pools[int(c)], size=per_class, replace=False)
                           for c in chosen])
    rows = rows[rng.permutation(global_batch_size)]
    start = process_index * local
    return rows[start : start + local]


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    """Global eval batches needed to visit every example once (the last one padded)."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    return -(-num_examples // global_batch_size)


def eval_indices(
    num_examples: int,
    *,
    global_batch_size: int,
    batch: int,
    process_index: int,
    process_count: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, mask) of this process's rows of eval ``batch``; padding rows point at 0."""
    local = local_batch_size(global_batch_size, process_count)
    positions = batch * global_batch_size + process_index * local + np.arange(local)
    mask = positions < num_examples
    return np.where(mask, positions, 0), mask


def _check_batch(batch: Any, expected_rows: int) -> Batch:
    if not isinstance(batch, dict):
        raise TypeError(f"a source must return a dict of arrays, got {type(batch).__name__}")
    for key, value in batch.items():
        if np.shape(value)[:1] != (expected_rows,):
            raise ValueError(
                f"source returned {key!r} with shape {np.shape(value)}; expected {expected_rows} "
                "rows (one per requested index)"
            )
    return batch


class _Prefetcher:
    """Iterates ``produce()`` in a background thread, up to ``prefetch`` items ahead.

    The thread starts at construction, so batches load while the caller compiles or evaluates.
    An exception raised in the thread is re-raised in the consumer. ``close()`` (also called by
    ``with``, by exhausting the iterator, and on garbage collection) stops the thread; the thread
    holds no reference to this object, so an abandoned iterator is collected and cleans up.
    """

    _DONE = object()

    def __init__(self, produce: Callable[[], Iterator[Batch]], prefetch: int):
        self._items: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(
            target=self._work, args=(produce, self._items, self._stop), name="host-prefetch",
            daemon=True,
        )
        self._thread.start()

    @staticmethod
    def _work(produce: Callable[[], Iterator[Batch]], items: queue.Queue,
              stop: threading.Event) -> None:
        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    items.put(item, timeout=_POLL_SECONDS)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for item in produce():
                if not put(item):
                    return
            put(_Prefetcher._DONE)
        except BaseException as err:  # noqa: BLE001 (handed to the consumer, raised there)
            put(err)

    def __iter__(self) -> "_Prefetcher":
        return self

    def __next__(self) -> Batch:
        if self._finished:
            raise StopIteration
        item = self._items.get()
        if item is self._DONE:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        """Stops the producer thread and waits for it to exit."""
        self._finished = True
        self._stop.set()
        # Free a producer blocked on a full queue, then wait for it to notice `stop`.
        while self._thread.is_alive():
            try:
                self._items.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                pass
            self._thread.join(timeout=_POLL_SECONDS)

    def __enter__(self) -> "_Prefetcher":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._finished:
            self._stop.set()


def _background(produce: Callable[[], Iterator[Batch]], prefetch: int) -> Iterator[Batch]:
    """``produce()`` prefetched in a thread, or run inline when ``prefetch`` <= 0."""
    if prefetch <= 0:
        return iter(produce())
    return _Prefetcher(produce, prefetch)


def train_batches(
    source: Any,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int,
    num_steps: int,
    process_index: int | None = None,
    process_count: int | None = None,
    prefetch: int = 2,
    classes_per_batch: int = 0,
) -> Iterator[Batch]:
    """Local training batches for steps ``start_step .. start_step + num_steps - 1``.

    Batch ``s`` depends only on ``(seed, s)``: resuming at ``start_step`` reproduces the batches
    of an uninterrupted run. Each yielded dict holds this process's ``global_batch_size /
    process_count`` rows. ``process_index``/``process_count`` default to jax's.
    ``classes_per_batch=k > 0`` draws class-stratified batches (``class_batch_indices``; needs
    labels) instead of epoch permutations.
    """
    process_index, process_count = _resolve_processes(process_index, process_count)
    num_examples = len(source)
    local = local_batch_size(global_batch_size, process_count)
    steps_per_epoch(num_examples, global_batch_size)  # fail now, not in the thread
    if start_step < 0 or num_steps < 0:
        raise ValueError(f"start_step and num_steps must be >= 0, got {start_step}, {num_steps}")
    pools = None
    if classes_per_batch:
        labels = source_labels(source)
        unlabelled = int(np.sum(labels < 0))
        if unlabelled:
            # Stratified batches draw from labelled examples only: the unlabelled ones would
            # never be seen, while the epoch length would still count them.
            raise ValueError(
                f"classes_per_batch={classes_per_batch} draws batches by class, but "
                f"{unlabelled} of the {num_examples} pre-training examples are unlabelled "
                "(label -1, e.g. STL10's 'unlabelled' split) and would never be used. "
                "Pre-train on labelled splits only (e.g. --config.data.pretrain_split=train) "
                "or set --config.data.classes_per_batch=0"
            )
        pools = class_pools(labels)
        per_class = check_classes_per_batch(pools, global_batch_size, classes_per_batch)
        small = {c: int(idx.size) for c, idx in sorted(pools.items()) if idx.size < per_class}
        if small:
            # As the unlabelled ones above: classes too small to fill their share of a batch
            # are never drawn, and their examples never used.
            raise ValueError(
                f"classes_per_batch={classes_per_batch} takes {per_class} examples of each drawn "
                f"class, but classes {sorted(small)} hold fewer ({small}) and would never be "
                "used. Lower the batch size or raise classes_per_batch, or leave those classes "
                "out of the data")

    def produce() -> Iterator[Batch]:
        cache: dict = {}
        for step in range(start_step, start_step + num_steps):
            if pools is not None:
                index = class_batch_indices(
                    pools,
                    global_batch_size=global_batch_size,
                    classes_per_batch=classes_per_batch,
                    seed=seed,
                    step=step,
                    process_index=process_index,
                    process_count=process_count,
                )
            else:
                index = train_indices(
                    num_examples,
                    global_batch_size=global_batch_size,
                    seed=seed,
                    step=step,
                    process_index=process_index,
                    process_count=process_count,
                    _cache=cache,
                )
            yield _check_batch(source[index], local)

    return _background(produce, prefetch)


def eval_batches(
    source: Any,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """Local eval batches covering every example exactly once, with a boolean ``mask``.

    Every process yields the same number of batches (``ceil(len / global_batch_size)``), as SPMD
    steps need; rows past the end are zeros with ``mask`` False.
    """
    process_index, process_count = _resolve_processes(process_index, process_count)
    num_examples = len(source)
    if num_examples == 0:
        raise ValueError("eval_batches: the source is empty")
    local = local_batch_size(global_batch_size, process_count)

    def produce() -> Iterator[Batch]:
        for batch in range(num_eval_batches(num_examples, global_batch_size)):
            index, mask = eval_indices(
                num_examples,
                global_batch_size=global_batch_size,
                batch=batch,
                process_index=process_index,
                process_count=process_count,
            )
            arrays = dict(_check_batch(source[index], local))
            if "mask" in arrays:
                raise ValueError("the source already returns a 'mask' entry; rename it")
            if not mask.all():
                # Zero the padding rows so nothing downstream mistakes them for data.
                arrays = {k: np.where(_expand(mask, v), v, np.zeros_like(v)) for k, v in
                          arrays.items()}
            arrays["mask"] = mask
            yield arrays

    return _background(produce, prefetch)


def _expand(mask: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Broadcasts a row mask over the trailing axes of ``like``."""
    return mask.reshape(mask.shape + (1,) * (np.ndim(like) - 1))
