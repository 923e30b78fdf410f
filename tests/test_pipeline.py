"""Host pipeline: deterministic resumable training order, process slices, padded eval batches."""

import threading
import time

import numpy as np
import pytest

from cldro_jax.data import images, pipeline


class IndexSource:
    """A generic random-access source: returns the indices it was asked for, plus a payload."""

    def __init__(self, n, fail_at=None):
        self.n = n
        self.fail_at = fail_at
        self.calls = 0

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        self.calls += 1
        index = np.asarray(index)
        if self.fail_at is not None and np.any(index == self.fail_at):
            raise RuntimeError(f"broken example {self.fail_at}")
        return {"idx": index.copy(), "x": np.repeat(index[:, None], 3, axis=1).astype(np.uint8)}


def _collect(source, **kwargs):
    return [b["idx"] for b in pipeline.train_batches(source, **kwargs)]


def _prefetch_threads():
    return sum(t.name == "host-prefetch" and t.is_alive() for t in threading.enumerate())


def test_order_is_a_function_of_seed_and_step():
    src = IndexSource(103)
    kw = dict(global_batch_size=10, start_step=0, num_steps=25, process_index=0, process_count=1)
    first = _collect(src, seed=7, **kw)
    again = _collect(src, seed=7, **kw)
    other = _collect(src, seed=8, **kw)
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    assert not np.array_equal(np.stack(first), np.stack(other))
    # Payload rows follow their indices (the source is queried with exactly these indices).
    batch = next(pipeline.train_batches(src, seed=7, **kw))
    np.testing.assert_array_equal(batch["x"][:, 0], batch["idx"])


def test_resume_from_step_matches_uninterrupted_run():
    src = IndexSource(57)
    kw = dict(global_batch_size=8, seed=3, process_index=0, process_count=1)
    full = _collect(src, start_step=0, num_steps=30, **kw)
    head = _collect(src, start_step=0, num_steps=11, **kw)
    tail = _collect(src, start_step=11, num_steps=19, **kw)
    np.testing.assert_array_equal(np.stack(full), np.stack(head + tail))


@pytest.mark.parametrize("n,batch", [(60, 12), (103, 10)])
def test_each_epoch_visits_each_example_at_most_once(n, batch):
    src = IndexSource(n)
    per_epoch = n // batch
    steps = pipeline.steps_per_epoch(n, batch)
    assert steps == per_epoch
    batches = _collect(src, global_batch_size=batch, seed=0, start_step=0, num_steps=3 * per_epoch,
                       process_index=0, process_count=1)
    epochs = [np.concatenate(batches[e * per_epoch:(e + 1) * per_epoch]) for e in range(3)]
    for seen in epochs:
        assert seen.size == per_epoch * batch
        assert np.unique(seen).size == seen.size  # no repeats within an epoch
        assert seen.min() >= 0 and seen.max() < n
    if n % batch == 0:
        for seen in epochs:
            np.testing.assert_array_equal(np.sort(seen), np.arange(n))
    # A fresh permutation each epoch.
    assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_partition_the_global_batch(process_count):
    src = IndexSource(96)
    kw = dict(global_batch_size=16, seed=5, start_step=4, num_steps=9)
    whole = _collect(src, process_index=0, process_count=1, **kw)
    parts = [_collect(src, process_index=p, process_count=process_count, **kw)
             for p in range(process_count)]
    for step, global_batch in enumerate(whole):
        local = [parts[p][step] for p in range(process_count)]
        assert all(b.shape == (16 // process_count,) for b in local)
        np.testing.assert_array_equal(np.concatenate(local), global_batch)


def test_bad_batch_arguments_raise_clear_errors():
    src = IndexSource(20)
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        pipeline.train_batches(src, global_batch_size=8, seed=0, start_step=0, num_steps=1,
                               process_index=0, process_count=3)
    with pytest.raises(ValueError, match="exceeds the 20 examples"):
        pipeline.train_batches(src, global_batch_size=32, seed=0, start_step=0, num_steps=1,
                               process_index=0, process_count=1)
    with pytest.raises(ValueError, match="process_index < process_count"):
        pipeline.eval_batches(src, global_batch_size=8, process_index=2, process_count=2)


def test_process_defaults_come_from_jax():
    src = IndexSource(32)
    default = _collect(src, global_batch_size=8, seed=1, start_step=0, num_steps=3)
    explicit = _collect(src, global_batch_size=8, seed=1, start_step=0, num_steps=3,
                        process_index=0, process_count=1)
    np.testing.assert_array_equal(np.stack(default), np.stack(explicit))


@pytest.mark.parametrize("process_count", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 23, 24, 50])
def test_eval_counts_every_example_exactly_once(n, process_count):
    src = IndexSource(n)
    global_batch = 4 * process_count
    counts = np.zeros(n, int)
    num_batches = []
    for p in range(process_count):
        batches = list(pipeline.eval_batches(src, global_batch_size=global_batch,
                                             process_index=p, process_count=process_count))
        num_batches.append(len(batches))
        for b in batches:
            assert b["mask"].dtype == bool and b["mask"].shape == (4,)
            assert b["idx"].shape == (4,) and b["x"].shape == (4, 3)
            np.add.at(counts, b["idx"][b["mask"]], 1)
            # Padding rows are zeroed.
            assert not b["x"][~b["mask"]].any()
    np.testing.assert_array_equal(counts, np.ones(n, int))
    # Every process runs the same number of (SPMD) steps: ceil(n / global batch).
    assert num_batches == [-(-n // global_batch)] * process_count


def test_works_with_an_image_source():
    rng = np.random.default_rng(0)
    src = images.InMemorySource(rng.integers(0, 256, (30, 5, 5, 1), dtype=np.uint8),
                                np.arange(30) % 3)
    batches = list(pipeline.eval_batches(src, global_batch_size=8, process_index=0,
                                         process_count=1))
    got = np.concatenate([b["image"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(got, src.images)
    assert all(b["image"].dtype == np.uint8 for b in batches)
    train = next(pipeline.train_batches(src, global_batch_size=8, seed=0, start_step=0,
                                        num_steps=1, process_index=0, process_count=1))
    assert train["image"].shape == (8, 5, 5, 1) and train["image"].dtype == np.uint8


@pytest.mark.parametrize("prefetch", [0, 2])
def test_source_exception_surfaces_in_consumer(prefetch):
    src = IndexSource(40, fail_at=np.int64(-1))
    # Find a step whose batch contains example 13, then make the source fail on it.
    kw = dict(global_batch_size=8, seed=2, start_step=0, num_steps=5, process_index=0,
              process_count=1)
    bad_step = next(i for i, b in enumerate(_collect(src, **kw)) if 13 in b)
    src.fail_at = 13
    got = []
    with pytest.raises(RuntimeError, match="broken example 13"):
        for b in pipeline.train_batches(src, prefetch=prefetch, **kw):
            got.append(b)
    assert len(got) == bad_step
    assert _prefetch_threads() == 0


def test_early_stop_shuts_the_thread_down_and_prefetch_is_bounded():
    baseline = _prefetch_threads()
    src = IndexSource(1000)
    it = pipeline.train_batches(src, global_batch_size=10, seed=0, start_step=0, num_steps=100,
                                process_index=0, process_count=1, prefetch=2)
    next(it)
    time.sleep(0.3)
    # One consumed, at most `prefetch` queued, at most one more in the producer's hands.
    assert src.calls <= 1 + 2 + 1
    assert _prefetch_threads() == baseline + 1
    it.close()
    assert _prefetch_threads() == baseline
    with pytest.raises(StopIteration):
        next(it)
    # Leaving a loop early and dropping the iterator also ends the thread.
    for _ in pipeline.train_batches(src, global_batch_size=10, seed=0, start_step=0,
                                    num_steps=100, process_index=0, process_count=1):
        break
    deadline = time.time() + 5
    while _prefetch_threads() > baseline and time.time() < deadline:
        time.sleep(0.05)
    assert _prefetch_threads() == baseline


def test_source_returning_wrong_rows_is_an_error():
    class Bad(IndexSource):
        def __getitem__(self, index):
            return {"x": np.zeros((1, 2))}

    with pytest.raises(ValueError, match="expected 4 rows"):
        next(pipeline.train_batches(Bad(8), global_batch_size=4, seed=0, start_step=0,
                                    num_steps=1, process_index=0, process_count=1))


def test_subset_is_a_source():
    src = IndexSource(50)
    sub = pipeline.Subset(src, np.arange(10, 30))
    assert len(sub) == 20
    np.testing.assert_array_equal(sub[np.array([0, 19, 5])]["idx"], [10, 29, 15])
    seen = np.concatenate([b["idx"][b["mask"]] for b in pipeline.eval_batches(
        sub, global_batch_size=6, process_index=0, process_count=1)])
    np.testing.assert_array_equal(seen, np.arange(10, 30))
    image_source = images.InMemorySource(np.zeros((5, 3, 3, 1), np.uint8), np.arange(5))
    assert pipeline.Subset(image_source, [1, 2]).image_shape == (3, 3, 1)
    with pytest.raises(IndexError, match="outside the 50 examples"):
        pipeline.Subset(src, [49, 50])
    with pytest.raises(IndexError):
        sub[np.array([20])]
