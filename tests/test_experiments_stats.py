"""The experiment scripts' statistics on fixed numbers, against scipy / NumPy.

No training here: each test feeds a pure function of `experiments/` the kind of input a real run
can produce (a run without a score, a diverged run's NaN, padded anchors with no negatives) and
compares what the tables would print with the textbook computation.
"""

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from experiments import common, sampling_bias, weights_plot


def test_paired_difference_agrees_with_scipy_ttest_rel():
  rng = np.random.default_rng(0)
  reference = 70 + rng.normal(size=7)
  scores = reference + 0.4 + 0.8 * rng.normal(size=7)
  # Seeds given in another order than the reference's: pairing is by seed, not by position.
  order = rng.permutation(7)
  d = common.paired_difference(list(scores[order]), list(order), list(reference), list(range(7)))
  expected = stats.ttest_rel(scores, reference)
  ci = expected.confidence_interval(0.95)
  assert d["n"] == 7 and d["mean"] == pytest.approx(np.mean(scores - reference))
  assert d["p"] == pytest.approx(expected.pvalue, rel=1e-9)
  assert (d["ci_low"], d["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_paired_difference_of_a_nan_score_is_no_evidence():
  # A diverged run's NaN score: scipy answers nan; a p of 0 would print as highly significant.
  d = common.paired_difference([math.nan, 71.0, 72.5], [0, 1, 2], [70.0, 70.0, 70.0], [0, 1, 2])
  assert math.isnan(stats.ttest_rel([math.nan, 71.0, 72.5], [70.0, 70.0, 70.0]).pvalue)
  assert math.isnan(d["p"]) and math.isnan(d["ci_low"]) and math.isnan(d["ci_high"])
  assert (d["wins"], d["losses"], d["ties"]) == (2, 0, 0)   # the NaN seed is not a tie
  rows = [{"label": "InfoNCE", "score": [70.0, 70.0, 70.0], "seeds": [0, 1, 2]},
          {"label": "ADNCE", "score": [math.nan, 71.0, 72.5], "seeds": [0, 1, 2]}]
  line = common.paired_table(rows, "InfoNCE", "linear probe").splitlines()[-1]
  assert "0.000" not in line and line.endswith("| 2 / 0 / 0 |")
  # Equal non-zero differences stay what scipy says: an infinite t, p = 0.
  d = common.paired_difference([71.0, 71.0], [0, 1], [70.0, 70.0], [0, 1])
  with warnings.catch_warnings():   # scipy notes the zero spread, then answers t = inf
    warnings.simplefilter("ignore", RuntimeWarning)
    assert d["p"] == stats.ttest_rel([71.0, 71.0], [70.0, 70.0]).pvalue == 0.0


def test_sampling_bias_changes_and_gaps_are_paired_by_seed_and_skip_missing_scores():
  # Method A misses seed 1 at the uniform level (no score); the oracle ran seeds 0-2 everywhere.
  runs = {("A", 0): ([70.0, None, 74.0], [0, 1, 2]), ("A", 2): ([66.0, 67.0, 69.0], [0, 1, 2]),
          ("oracle", 0): ([73.0, 71.0, 75.0], [0, 1, 2]),
          ("oracle", 2): ([71.0, 69.0, 72.0], [2, 1, 0])}
  change, gaps = sampling_bias.changes_and_gaps(runs, ["A", "oracle"], [0, 2], "oracle")
  # Paired by seed over the seeds both have: A's change on seeds 0 and 2, its gaps seed by seed.
  assert change["A"] == pytest.approx(np.mean([66.0 - 70.0, 69.0 - 74.0]))
  assert change["oracle"] == pytest.approx(np.mean([72.0 - 73.0, 69.0 - 71.0, 71.0 - 75.0]))
  assert gaps["A"][0] == pytest.approx(np.mean([70.0 - 73.0, 74.0 - 75.0]))
  assert gaps["A"][2] == pytest.approx(np.mean([66.0 - 72.0, 67.0 - 69.0, 69.0 - 71.0]))
  assert "oracle" not in gaps


def test_weight_stats_average_over_the_anchors_that_have_negatives():
  # Two real anchors and a padded one (valid=False: no negatives), as in a partial graph batch.
  sims = np.array([[0.0, 0.9, 0.1, 0.5], [0.9, 0.0, 0.3, 0.7], [0.0, 0.0, 0.0, 0.0]])
  mask = np.array([[False, True, True, True], [True, False, True, True], [False] * 4])
  same = np.array([[False, True, False, False], [True, False, False, True], [False] * 4])
  t = 0.2
  rel = weights_plot.relative_weights(sims, mask, t)
  got = weights_plot.weight_stats(rel, mask, sims, same)
  ess, mass_same, share_same, mass_top = [], [], [], []
  for i in (0, 1):
    s = sims[i][mask[i]]
    q = np.exp(s / t) / np.exp(s / t).sum()
    ess.append(1.0 / (s.size * np.sum(q ** 2)))
    mass_same.append(q[same[i][mask[i]]].sum())
    share_same.append(same[i][mask[i]].mean())
    mass_top.append(q.max())   # 5% of 3 negatives rounds to the single most similar one
  assert got["ess"] == pytest.approx(np.mean(ess), rel=1e-5)
  assert got["mass_same_class"] == pytest.approx(np.mean(mass_same), rel=1e-5)
  assert got["share_same_class"] == pytest.approx(np.mean(share_same))
  assert got["mass_top5pct"] == pytest.approx(np.mean(mass_top), rel=1e-5)
  assert got["max_relative_weight"] == pytest.approx(3 * max(mass_top), rel=1e-5)
