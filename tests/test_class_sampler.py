"""Class-stratified training batches (`config.data.classes_per_batch`), the sampling-bias knob."""

import numpy as np
import pytest
from scipy import stats

from cldro_jax import config_defaults
from cldro_jax.data import images, pipeline


class LabelledSource:
  """A source whose rows carry their own index and a label (no `labels` attribute: read path)."""

  def __init__(self, labels):
    self._labels = np.asarray(labels, np.int32)

  def __len__(self):
    return self._labels.size

  def __getitem__(self, index):
    index = np.asarray(index)
    return {"idx": index.copy(), "label": self._labels[index]}


def balanced_labels(num_classes, per_class, seed=0):
  labels = np.repeat(np.arange(num_classes), per_class)
  return np.random.default_rng(seed).permutation(labels)


def collect(source, **kwargs):
  return [b for b in pipeline.train_batches(source, prefetch=0, **kwargs)]


def test_each_batch_holds_k_classes_with_equal_counts():
  labels = balanced_labels(10, 30)
  src = LabelledSource(labels)
  for k in (1, 2, 5):
    batches = collect(src, global_batch_size=20, seed=3, start_step=0, num_steps=40,
                      classes_per_batch=k, process_index=0, process_count=1)
    for b in batches:
      np.testing.assert_array_equal(b["label"], labels[b["idx"]])   # rows match their indices
      classes, counts = np.unique(b["label"], return_counts=True)
      assert classes.size == k and set(counts) == {20 // k}
      assert np.unique(b["idx"]).size == 20                         # no repeats within a batch


def test_same_class_share_of_negatives_is_exact():
  # Image variant: anchor i has 2B-2 negatives, 2(B/k)-2 of them from its own class.
  labels = balanced_labels(10, 50)
  batch, k = 24, 3
  b = collect(LabelledSource(labels), global_batch_size=batch, seed=0, start_step=5,
              num_steps=1, classes_per_batch=k, process_index=0, process_count=1)[0]
  both = np.concatenate([b["label"], b["label"]])
  same = both[:, None] == both[None, :]
  n = 2 * batch
  pair = (np.arange(n) + batch) % n
  negatives = ~np.eye(n, dtype=bool)
  negatives[np.arange(n), pair] = False
  share = (same & negatives).sum(1) / negatives.sum(1)
  np.testing.assert_allclose(share, (batch // k - 1) / (batch - 1))


def test_order_is_a_function_of_seed_and_step_and_resume_is_exact():
  src = LabelledSource(balanced_labels(6, 20))
  kw = {"global_batch_size": 12, "classes_per_batch": 3, "process_index": 0, "process_count": 1}
  full = collect(src, seed=1, start_step=0, num_steps=30, **kw)
  head = collect(src, seed=1, start_step=0, num_steps=13, **kw)
  tail = collect(src, seed=1, start_step=13, num_steps=17, **kw)
  np.testing.assert_array_equal(np.stack([b["idx"] for b in full]),
                                np.stack([b["idx"] for b in head + tail]))
  other = collect(src, seed=2, start_step=0, num_steps=30, **kw)
  assert not np.array_equal(np.stack([b["idx"] for b in full]),
                            np.stack([b["idx"] for b in other]))


def test_process_slices_tile_the_global_batch():
  src = LabelledSource(balanced_labels(5, 40))
  kw = {"global_batch_size": 20, "classes_per_batch": 2, "seed": 9, "start_step": 4, "num_steps": 6}
  whole = collect(src, process_index=0, process_count=1, **kw)
  parts = [collect(src, process_index=p, process_count=4, **kw) for p in range(4)]
  for step, batch in enumerate(whole):
    np.testing.assert_array_equal(batch["idx"],
                                  np.concatenate([parts[p][step]["idx"] for p in range(4)]))
  # The rows are shuffled after drawing, so each process slice mixes the classes.
  assert any(np.unique(parts[0][s]["label"]).size == 2 for s in range(6))


def test_classes_and_examples_are_drawn_uniformly():
  # Unequal class sizes: each class is drawn with probability k / C per step, each of its
  # examples with probability (B/k) / size when the class is drawn (chi-square, fixed seeds).
  sizes = [40, 60, 80, 100]
  labels = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)])
  src = LabelledSource(labels)
  steps, batch, k = 1500, 10, 2
  batches = collect(src, global_batch_size=batch, classes_per_batch=k, seed=0, start_step=0,
                    num_steps=steps, process_index=0, process_count=1)
  chosen = np.array([np.unique(b["label"]) for b in batches])      # (steps, k)
  class_counts = np.bincount(chosen.ravel(), minlength=4)
  assert stats.chisquare(class_counts).pvalue > 1e-3
  visits = np.bincount(np.concatenate([b["idx"] for b in batches]), minlength=labels.size)
  big = labels == 3
  # Within the largest class every example is equally likely.
  assert stats.chisquare(visits[big]).pvalue > 1e-3
  np.testing.assert_allclose(visits[big].mean(), class_counts[3] * (batch // k) / sizes[3])


def test_labels_come_from_attributes_and_unlabelled_examples_are_refused():
  labels = np.concatenate([np.full(15, -1), balanced_labels(3, 10)])
  src = images.InMemorySource(np.zeros((labels.size, 2, 2, 1), np.uint8), labels)
  np.testing.assert_array_equal(pipeline.source_labels(src), labels)
  sub = pipeline.Subset(src, np.arange(10, 30))
  np.testing.assert_array_equal(pipeline.source_labels(sub), labels[10:30])
  # STL10's pre-training source: labelled train + an unlabelled split, which is never decoded.
  unlabelled_split = images.TfdsSource(_ExplodingSource(40), image_shape=(2, 2, 1),
                                       unlabeled=True)
  both = images.ConcatSource([images.InMemorySource(src.images[15:], labels[15:]),
                              unlabelled_split])
  np.testing.assert_array_equal(pipeline.source_labels(both),
                                np.concatenate([labels[15:], np.full(40, -1)]))
  # Stratified batches would never draw the unlabelled examples: refused, with the fix.
  for source, count in ((src, 15), (both, 40)):
    with pytest.raises(ValueError, match=rf"{count} of the {len(source)} pre-training examples "
                       r"are unlabelled.*--config.data.pretrain_split=train"):
      pipeline.train_batches(source, global_batch_size=6, classes_per_batch=3, seed=0,
                             start_step=0, num_steps=1, process_index=0, process_count=1)


class _ExplodingSource:
  """A tfds data source whose examples must not be read."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    raise AssertionError("the unlabelled split was decoded")


@pytest.mark.parametrize("labels,batch,k,match", [
    (balanced_labels(4, 10), 10, 3, "must divide the global batch size 10"),
    (balanced_labels(4, 10), 12, 6, "needs 6 classes with at least 2"),
    # Class 0 has too few examples for 4 per batch: only 2 classes qualify.
    (np.concatenate([np.full(3, 0), np.full(20, 1), np.full(20, 2)]), 12, 3, "source has 2 such"),
    (np.full(40, -1), 8, 2, "40 of the 40 pre-training examples are unlabelled"),
    # Enough classes qualify, but class 3 (3 examples) could never fill its 5 rows: its
    # examples would never be used.
    (np.concatenate([np.full(20, 0), np.full(20, 1), np.full(20, 2), np.full(3, 3)]), 10, 2,
     r"classes \[3\] hold fewer \(\{3: 3\}\) and would never be used"),
])
def test_impossible_requests_fail_fast_with_the_fix(labels, batch, k, match):
  src = LabelledSource(labels)
  with pytest.raises(ValueError, match=match):
    pipeline.train_batches(src, global_batch_size=batch, classes_per_batch=k, seed=0,
                           start_step=0, num_steps=1, process_index=0, process_count=1)


def test_a_source_without_labels_is_refused():
  class NoLabels:
    def __len__(self):
      return 20

    def __getitem__(self, index):
      return {"x": np.asarray(index)}

  with pytest.raises(ValueError, match="no 'label' entry"):
    pipeline.train_batches(NoLabels(), global_batch_size=4, classes_per_batch=2, seed=0,
                           start_step=0, num_steps=1, process_index=0, process_count=1)


def test_image_task_uses_the_config_option():
  from cldro_jax import train  # pylint: disable=import-outside-toplevel
  from cldro_jax.tasks import image  # pylint: disable=import-outside-toplevel
  from configs import quickstart  # pylint: disable=import-outside-toplevel

  config = quickstart.get_config("runlocal")
  config.data.train_per_class = 20
  config.batch_size = 16
  config.data.classes_per_batch = 2
  config_defaults.validate_config(config)
  task = image.ImageTask(config, train.make_mesh(1))
  batches = task.train_batches(start_step=0, num_steps=3)
  try:
    for _ in range(3):
      labels = next(batches)["label"]
      assert sorted(np.unique(labels, return_counts=True)[1]) == [8, 8]
  finally:
    batches.close()
