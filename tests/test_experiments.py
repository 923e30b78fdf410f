"""The experiment scripts' quick modes, each checked against a known answer, and the adaptive
ADNCE rule against NumPy.

Each quick mode trains tiny real runs (shipped Fashion-MNIST images, ResNet-18 width 4, 10 steps)
through the trainer; the known answers are recomputed here in float64 NumPy from what the
scripts dump (the projections of a replayed training step), independently of cldro_jax.losses.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_losses as ref
from helpers import read_json
from jax.sharding import PartitionSpec as P

from cldro_jax import config_defaults, losses
from cldro_jax import metrics as metrics_lib
from experiments import (
  adaptive_adnce,
  adnce_sensitivity,
  common,
  compare_losses,
  dro_family,
  sampling_bias,
  temperature_radius,
  weights_plot,
)


def image_negatives(z1, z2):
  """float64 cosines of the image layout (2B anchors over concat(z1, z2)) and the mask of each
  anchor's 2B-2 negatives (itself and its pair excluded)."""
  z = ref.normalize(np.concatenate([z1, z2]))
  n = z.shape[0]
  mask = ~np.eye(n, dtype=bool)
  mask[np.arange(n), (np.arange(n) + n // 2) % n] = False
  return z @ z.T, mask


def run_quick(module, out, *extra):
  return module.main(["--out", str(out), "--quick", "--seeds", "0", *extra])


# ------------------------------------------------------------------------------ quick modes


@pytest.fixture(scope="module")
def compare_out(tmp_path_factory):
  out = tmp_path_factory.mktemp("compare")
  return out, run_quick(compare_losses, out)


def test_compare_losses_quick_adnce_with_huge_sigma_is_infonce(compare_out):
  out, summary = compare_out
  runs = {r["overrides"]["loss.name"]: r for r in summary["runs"]}
  assert set(runs) == {"infonce", "adnce"} and runs["adnce"]["overrides"]["loss.sigma"] == 1e6
  lines = {name: metrics_lib.read_metrics(r["workdir"], "train") for name, r in runs.items()}
  info = np.array([r["loss"] for r in lines["infonce"]])
  adn = np.array([r["loss"] for r in lines["adnce"]])
  assert info.shape == adn.shape == (10,)
  # Same seed, same batches: the first steps agree to float32 rounding (the two programs are
  # compiled separately, so rounding differs in the last bits and Adam amplifies it slowly).
  np.testing.assert_allclose(adn[:3], info[:3], rtol=1e-5)
  np.testing.assert_allclose(adn, info, rtol=2e-2)
  # ADNCE's weights at sigma = 1e6 are all 1: the logged weight range says so.
  assert all(abs(r["adnce_w_max"] - 1) < 1e-5 and abs(r["adnce_w_min"] - 1) < 1e-5
             for r in lines["adnce"])
  res_i, res_a = runs["infonce"]["results"], runs["adnce"]["results"]
  for key in ("final_knn_top1", "linear_probe_top1"):
    assert abs(res_i[key] - res_a[key]) <= 2.5 + 1e-9   # at most one of 40 test images flips
  # The table and the figures exist and the table holds both losses' scores.
  text = (out / "compare_losses.md").read_text()
  assert "| infonce | t=0.2 |" in text and "adnce (sigma=1e+06)" in text
  for key in ("knn_top1", "online_probe_top1", "train_loss"):
    assert (out / f"compare_losses_{key}.png").stat().st_size > 10_000
  saved = json.loads((out / "compare_losses.json").read_text())
  assert len(saved["curves"]["infonce"]["knn_top1"]["epochs"]) == 2   # epochs 1 and 2


def test_compare_losses_quick_check_says_pass_or_fail(compare_out):
  _, summary = compare_out
  records = [common.RunRecord(
      spec=common.RunSpec(r["label"], r["seed"], tuple(r["overrides"].items())),
      workdir=r["workdir"], results=r["results"], wall_s=r["wall_s"], config=None)
      for r in summary["runs"]]
  assert compare_losses.quick_verdict(records).startswith("quick check PASSED")

  class Drifted(common.RunRecord):   # an ADNCE run whose loss moved 1e-3 from the start
    def train(self, key):
      steps, values = super().train(key)
      return steps, values * 1.001
  drifted = [Drifted(**vars(r)) if r.spec.label != "infonce" else r for r in records]
  verdict = compare_losses.quick_verdict(drifted)
  assert verdict.startswith("quick check FAILED: seed 0: relative difference 1.0e-03"), verdict


def test_compare_losses_reruns_skip_finished_runs(compare_out):
  out, first = compare_out
  again = run_quick(compare_losses, out)
  assert [r["wall_s"] for r in again["runs"]] == [r["wall_s"] for r in first["runs"]]
  for r in again["runs"]:   # no second training: one train line per step
    steps = [x["step"] for x in metrics_lib.read_metrics(r["workdir"], "train")]
    assert steps == list(range(1, 11))


def test_sensitivity_quick_every_mu_at_huge_sigma_is_infonce(tmp_path):
  summary = run_quick(adnce_sensitivity, tmp_path, "--runs", str(tmp_path / "runs"))
  runs = {r["label"]: r for r in summary["runs"]}
  assert set(runs) == {"InfoNCE", "ADNCE mu=0.1 sigma=1e+06", "ADNCE mu=0.9 sigma=1e+06"}
  for mu in (0.1, 0.9):   # each cell trained with its own mu and sigma
    workdir = runs[f"ADNCE mu={mu:g} sigma=1e+06"]["workdir"]
    with open(f"{workdir}/config.json", encoding="utf-8") as f:
      saved = json.load(f)
    assert (saved["loss"]["name"], saved["loss"]["mu"], saved["loss"]["sigma"]) == (
        "adnce", mu, 1e6)
  lines = {label: metrics_lib.read_metrics(r["workdir"], "train") for label, r in runs.items()}
  info = np.array([r["loss"] for r in lines["InfoNCE"]])
  for mu in (0.1, 0.9):
    adnce = lines[f"ADNCE mu={mu:g} sigma=1e+06"]
    # flat weights whatever mu: the first steps are InfoNCE's up to float32 rounding
    assert all(abs(r["adnce_w_max"] - 1) < 1e-5 and abs(r["adnce_w_min"] - 1) < 1e-5
               for r in adnce)
    np.testing.assert_allclose(np.array([r["loss"] for r in adnce])[:3], info[:3], rtol=1e-5)
  text = (tmp_path / "adnce_sensitivity.md").read_text()
  rows = {r["label"]: r for r in summary["methods"]}
  for label in runs:   # the grid table holds each cell's mean linear-probe score
    score = rows[label]["score"][0]
    assert f"| {common.fmt([score])} |" in text
  assert "| 0.1 |" in text and "| 0.9 |" in text and "| InfoNCE |" in text
  assert (tmp_path / "adnce_sensitivity.png").stat().st_size > 10_000


def test_dro_family_quick_mean_variance_at_huge_t_is_the_basic_objective(tmp_path):
  summary = run_quick(dro_family, tmp_path, "--runs", str(tmp_path / "runs"))
  runs = {r["label"]: r for r in summary["runs"]}
  huge = f"mean-variance t={dro_family.QUICK_HUGE_T:g}"
  assert set(runs) == {dro_family.BASIC, huge}
  saved = {}
  for label, r in runs.items():   # each run trained its own objective
    with open(f"{r['workdir']}/config.json", encoding="utf-8") as f:
      saved[label] = json.load(f)["loss"]
  assert (saved[dro_family.BASIC]["name"], saved[dro_family.BASIC]["eta"]) == ("chi2_dro", 0.0)
  assert (saved[huge]["name"], saved[huge]["temperature"]) == ("mean_variance", 1e9)
  lines = {label: metrics_lib.read_metrics(r["workdir"], "train") for label, r in runs.items()}
  for label, t in ((dro_family.BASIC, np.inf), (huge, 1e9)):
    # Every logged loss is the objective of that step's logged statistics (computed by
    # losses.diagnostics, not by the loss): -mean f+ + mean f_neg (+ mean Var / 2t).
    for r in lines[label]:
      expected = r["s_neg_mean"] - r["s_pos_mean"] + r["s_neg_var"] / (2 * t)
      assert r["loss"] == pytest.approx(expected, abs=2e-6)
  basic = np.array([r["loss"] for r in lines[dro_family.BASIC]])
  other = np.array([r["loss"] for r in lines[huge]])
  assert basic.shape == other.shape == (10,)
  # No variance term left at t = 1e9: the same training, seed for seed, up to float32 rounding.
  np.testing.assert_allclose(other[:3], basic[:3], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(other, basic, rtol=2e-2, atol=1e-3)
  text = (tmp_path / "dro_family.md").read_text()
  assert "Training statistics" in text and f"| {dro_family.BASIC} | eta=0 |" in text
  for name in ("dro_family_knn_top1", "dro_family_diagnostics"):
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
  saved_summary = json.loads((tmp_path / "dro_family.json").read_text())
  assert len(saved_summary["diagnostics"][huge]["s_neg_var"]["epochs"]) == 10
  ranks = saved_summary["effective_rank"]
  # The recorded rank is RankMe of the final encoder's test features, recomputed here with
  # scipy's entropy; the same training gives the same rank.
  from scipy import stats  # pylint: disable=import-outside-toplevel

  import cldro_jax  # pylint: disable=import-outside-toplevel
  from cldro_jax.data import images  # pylint: disable=import-outside-toplevel
  config = common.load_run_config(runs[dro_family.BASIC]["workdir"])
  test = images.materialize(images.load_image_dataset(config.data).test)
  features = cldro_jax.load_encoder(runs[dro_family.BASIC]["workdir"]).embed(test.images)
  singular = np.linalg.svd(features.astype(np.float64), compute_uv=False)
  assert ranks[dro_family.BASIC][0] == pytest.approx(np.exp(stats.entropy(singular)), rel=1e-4)
  assert ranks["feature_dim"] == features.shape[1]
  assert ranks[huge][0] == pytest.approx(ranks[dro_family.BASIC][0], rel=1e-3)


def test_dro_family_after_infonce_starts_each_seed_from_its_infonce_encoder(tmp_path):
  # The quick sizes, but the real method list (--etas 0: InfoNCE, KL-DRO, mean-variance, basic)
  # and one continuation, on two seeds.
  sets = [x for k, v in common.QUICK_OVERRIDES["image"].items() for x in ("--set", f"{k}={v!r}")]
  summary = dro_family.main(["--out", str(tmp_path), "--seeds", "0", "1", "--etas", "0",
                             "--set", "total_steps=4", "--set", "eval.every_epochs=0", *sets,
                             "--after-infonce", "chi2_dro:eta=3.0,label=chi2 eta=3",
                             "--temperatures", "0.3"])
  infonce = {r["seed"]: r["workdir"] for r in summary["runs"] if r["label"] == "InfoNCE"}
  warm = summary["after_infonce"]["runs"]
  assert [(r["label"], r["seed"]) for r in warm] == [("chi2 eta=3 after InfoNCE", 0),
                                                     ("chi2 eta=3 after InfoNCE", 1)]
  for r in warm:
    saved = read_json(r["workdir"], "config.json")
    assert saved["init_from"] == infonce[r["seed"]] and saved["loss"]["name"] == "chi2_dro"
    # Its first step saw InfoNCE's trained encoder, not a fresh one: the positives' cosine
    # logged at step 1 is not the untrained network's (the same for every loss of that seed).
    first = metrics_lib.read_metrics(r["workdir"], "train")[0]
    fresh = metrics_lib.read_metrics(infonce[r["seed"]], "train")[0]
    assert first["step"] == 1 and abs(first["s_pos_mean"] - fresh["s_pos_mean"]) > 1e-4
  text = (tmp_path / "dro_family.md").read_text()
  assert "Started from InfoNCE's trained encoder" in text
  assert (tmp_path / "dro_family_after_infonce_diagnostics.png").stat().st_size > 10_000
  assert len(summary["after_infonce"]["effective_rank"]["chi2 eta=3 after InfoNCE"]) == 2
  # --temperatures: InfoNCE and mean-variance at t=0.3, each run with that temperature.
  rows = summary["temperatures"]["0.3"]
  assert [r["label"] for r in rows] == ["InfoNCE t=0.3", "mean-variance t=0.3"]
  assert [r["hyper"] for r in rows] == ["t=0.3", "t=0.3"] and rows[0]["seeds"] == [0, 1]
  assert "across temperatures" in text
  assert (tmp_path / "dro_family_temperatures.png").stat().st_size > 10_000


def test_effective_rank_counts_the_directions_a_representation_uses():
  from scipy import stats  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  basis, _ = np.linalg.qr(rng.normal(size=(40, 40)))
  for r in (1, 3, 16):   # r orthogonal directions with equal weight: rank r
    orthonormal = np.linalg.svd(rng.normal(size=(200, r)), full_matrices=False)[0]
    whitened = orthonormal @ basis[:r]   # (200, 40), r equal singular values, the rest 0
    assert dro_family.effective_rank(whitened) == pytest.approx(r, rel=1e-4)
  features = rng.normal(size=(300, 40)) * np.linspace(0.1, 3.0, 40)
  singular = np.linalg.svd(features, compute_uv=False)
  # RankMe = exp(Shannon entropy of the normalised singular values), via scipy.
  assert dro_family.effective_rank(features) == pytest.approx(
      np.exp(stats.entropy(singular)), rel=1e-4)


def test_dro_family_methods_are_the_family_beside_infonce():
  labels = [m.label for m in dro_family.family_methods([0.75, 3.0], quick=False)]
  assert labels == ["InfoNCE", "KL-DRO", "mean-variance", "chi2-DRO eta=0.75", "chi2-DRO eta=3",
                    dro_family.BASIC]
  overrides = {m.label: dict(m.overrides) for m in dro_family.family_methods([3.0], quick=False)}
  assert overrides["chi2-DRO eta=3"] == {"loss.name": "chi2_dro", "loss.eta": 3.0}
  assert overrides[dro_family.BASIC] == {"loss.name": "chi2_dro", "loss.eta": 0.0}
  assert overrides["mean-variance"] == {"loss.name": "mean_variance"}


def test_sampling_bias_pretrains_stl10_on_its_labelled_split_only():
  # The class sampler refuses unlabelled images (tests/test_class_sampler.py); the experiment
  # drops STL10's unlabelled split at every level instead of failing.
  from configs import cifar10, stl10  # pylint: disable=import-outside-toplevel
  config = sampling_bias.labelled_pretraining(stl10.get_config())
  assert config.data.pretrain_split == "train"
  assert stl10.get_config().data.pretrain_split == "train+unlabelled"   # the copy was changed
  assert sampling_bias.labelled_pretraining(cifar10.get_config()).data.pretrain_split is None


def test_sampling_bias_quick_oracle_loss_is_masked_infonce(tmp_path):
  summary = run_quick(sampling_bias, tmp_path)
  # Batch 16 from 2 classes: 8 per class, so 7 of each anchor's 15 other examples share its class.
  assert summary["shares"]["2"] == pytest.approx(7 / 15, abs=1e-12)
  dump = np.load(tmp_path / "oracle_replay.npz")
  z1, z2, labels = dump["z1"], dump["z2"], dump["labels"]
  t = float(dump["temperature"])
  assert np.bincount(labels).max() == 8 and len(np.unique(labels)) == 2
  masked = ref.weighted_nce(z1, z2, t=t, variant="image", labels=labels)
  assert float(dump["logged_loss"]) == pytest.approx(masked, rel=2e-5)
  # Not vacuous: with half the negatives from the anchor's class, masking changes the loss.
  assert abs(ref.weighted_nce(z1, z2, t=t, variant="image") - masked) > 0.05
  assert (tmp_path / "sampling_bias.png").stat().st_size > 10_000
  assert "oracle InfoNCE" in (tmp_path / "sampling_bias.md").read_text()


def test_temperature_radius_quick_logged_radius_matches_numpy(tmp_path):
  summary = run_quick(temperature_radius, tmp_path)
  dump = np.load(tmp_path / "radius_replay.npz")
  t = float(dump["temperature"])
  sims, mask = image_negatives(dump["z1"], dump["z2"])
  np.testing.assert_array_equal(dump["negatives"], mask)
  np.testing.assert_allclose(dump["sims"], sims, atol=2e-6)
  var = np.array([sims[i][mask[i]].var() for i in range(sims.shape[0])])
  assert float(dump["logged_eta_hat"]) == pytest.approx(var.mean() / (2 * t * t), rel=1e-4)
  assert float(dump["logged_s_neg_var"]) == pytest.approx(var.mean(), rel=1e-4)
  # The replayed objectives: KL-DRO and mean-variance against the float64 reference.
  replays = summary["per_temperature"][str(t)]["replays"][0]
  assert [r["step"] for r in replays] == [5, 10]
  assert all(r["premium_exact"] > 0 for r in replays)   # Jensen: t log E e^(f/t) >= E f
  assert (tmp_path / "temperature_radius_objectives.png").stat().st_size > 10_000


def test_weights_plot_quick_infonce_weights_are_the_softmax(tmp_path):
  run_quick(weights_plot, tmp_path)
  dump = np.load(tmp_path / "weights.npz")
  t = float(dump["temperature"])
  sims, mask = image_negatives(dump["z1"], dump["z2"])
  n = mask.sum(1, keepdims=True)
  logits = np.where(mask, sims / t, -np.inf)
  softmax = np.exp(logits - logits.max(1, keepdims=True))
  softmax /= softmax.sum(1, keepdims=True)
  np.testing.assert_allclose(dump["infonce_weights"] / n, softmax, rtol=2e-4, atol=1e-9)
  for i, (mu, sigma) in enumerate(dump["adnce_settings"]):
    g = np.where(mask, np.exp(-(sims - mu) ** 2 / (2 * sigma ** 2)), 0.0)
    q = g * np.exp(np.where(mask, sims / t, 0.0))
    q /= q.sum(1, keepdims=True)
    np.testing.assert_allclose(dump[f"adnce_{i}_weights"] / n, q, rtol=2e-4, atol=1e-9)
  for name in ("vs_similarity", "binned", "gaussian"):
    assert (tmp_path / f"weights_plot_{name}.png").stat().st_size > 10_000


def test_adaptive_quick_mu_and_sigma_move_and_match_numpy(tmp_path):
  summary = run_quick(adaptive_adnce, tmp_path)
  run = summary["runs"][0]
  lines = metrics_lib.read_metrics(run["workdir"], "train")
  mu = np.array([r["adnce_mu"] for r in lines])
  sigma = np.array([r["adnce_sigma"] for r in lines])
  assert mu.size == sigma.size == 10
  assert np.ptp(mu) > 1e-3 and np.ptp(sigma) > 1e-3            # they really move
  assert np.unique(np.round(mu, 6)).size >= 5
  dump = np.load(tmp_path / "adaptive_replay.npz")
  assert str(dump["mu_rule"]) == "quantile" and str(dump["sigma_rule"]) == "std"
  sims, mask = image_negatives(dump["z1"], dump["z2"])
  negatives = sims[mask]
  assert float(dump["logged_mu"]) == pytest.approx(
      np.quantile(negatives, float(dump["mu_quantile"])), abs=2e-5)
  assert float(dump["logged_sigma"]) == pytest.approx(
      float(dump["sigma_scale"]) * negatives.std(), rel=1e-4)
  assert (tmp_path / "adaptive_adnce_mu_sigma.png").stat().st_size > 10_000


# ------------------------------------------------------------------------- adaptive rule


def _random_views(batch=6, dim=5, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(batch, dim)).astype(np.float32),
          rng.normal(size=(batch, dim)).astype(np.float32))


@pytest.mark.parametrize("variant", ["image", "sentence", "graph"])
def test_adaptive_mu_sigma_match_numpy_quantile_and_std(variant):
  z1, z2 = _random_views(batch=7)
  valid = np.array([True, True, False, True, True, True, True])
  labels = np.array([0, 1, 0, 2, 1, 2, 0], np.int32)
  mu, sigma = losses.adaptive_mu_sigma(
      jnp.asarray(z1), jnp.asarray(z2), mu=0.7, sigma=1.0, mu_rule="quantile", mu_quantile=0.8,
      sigma_rule="std", sigma_scale=1.5, variant=variant, valid=jnp.asarray(valid),
      labels=jnp.asarray(labels))
  # The pooled negatives of every valid anchor, from the float64 reference's candidate lists.
  pooled = np.concatenate([c for _, c in ref.anchors(z1, z2, variant, valid, labels)])
  assert float(mu) == pytest.approx(np.quantile(pooled, 0.8), abs=2e-6)
  assert float(sigma) == pytest.approx(1.5 * pooled.std(), rel=2e-5)


def test_adaptive_fixed_rules_return_the_given_values_and_stop_gradients():
  z1, z2 = (jnp.asarray(x) for x in _random_views())
  mu, sigma = losses.adaptive_mu_sigma(z1, z2, mu=0.3, sigma=0.6)
  assert (float(mu), float(sigma)) == pytest.approx((0.3, 0.6))

  def total(z):
    m, s = losses.adaptive_mu_sigma(z, z2, mu=0.0, sigma=1.0, mu_rule="quantile",
                                    sigma_rule="std")
    return m + s
  np.testing.assert_array_equal(np.asarray(jax.grad(total)(z1)), 0.0)


def test_adaptive_rule_under_shard_map_std_is_global_quantile_is_device_mean():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  z1, z2 = _random_views(batch=16, seed=3)

  def local(a, b):
    return losses.adaptive_mu_sigma(a, b, mu=0.0, sigma=1.0, mu_rule="quantile",
                                    mu_quantile=0.5, sigma_rule="std", variant="graph",
                                    axis_name="data")
  mu, sigma = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")),
                            out_specs=(P(), P()))(jnp.asarray(z1), jnp.asarray(z2))
  mu, sigma = jax.block_until_ready((mu, sigma))
  cos = ref.normalize(z1) @ ref.normalize(z2).T
  off = ~np.eye(16, dtype=bool)
  assert float(sigma) == pytest.approx(cos[off].std(), rel=2e-5)
  per_device = [np.quantile(cos[2 * d:2 * d + 2][off[2 * d:2 * d + 2]], 0.5) for d in range(8)]
  assert float(mu) == pytest.approx(np.mean(per_device), abs=2e-6)

  # A padded last batch: rows 11-15 invalid, so device 7 holds only padding and device 5 one
  # anchor. Devices weigh by their (anchor, negative) pairs; the empty one counts for nothing.
  valid = np.arange(16) < 11

  def local_valid(a, b, v):
    return losses.adaptive_mu_sigma(a, b, mu=0.0, sigma=1.0, mu_rule="quantile",
                                    mu_quantile=0.5, variant="graph", valid=v, axis_name="data")
  mu, _ = jax.block_until_ready(jax.shard_map(
      local_valid, mesh=mesh, in_specs=(P("data"),) * 3, out_specs=(P(), P()))(
          jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(valid)))
  pairs = off & valid[:, None] & valid[None, :]
  devices = [d for d in range(8) if pairs[2 * d:2 * d + 2].any()]
  quantiles = [np.quantile(cos[2 * d:2 * d + 2][pairs[2 * d:2 * d + 2]], 0.5) for d in devices]
  weights = [pairs[2 * d:2 * d + 2].sum() for d in devices]
  assert len(devices) == 6 and np.isfinite(float(mu))
  assert float(mu) == pytest.approx(np.average(quantiles, weights=weights), abs=2e-6)
  # No (anchor, negative) pair anywhere (every candidate shares the anchor's label): the given mu.
  mu, sigma = losses.adaptive_mu_sigma(jnp.asarray(z1), jnp.asarray(z2), mu=0.25, sigma=1.0,
                                       mu_rule="quantile", sigma_rule="std", variant="graph",
                                       labels=jnp.zeros(16, jnp.int32))
  assert (float(mu), float(sigma)) == (0.25, pytest.approx(losses.adaptive.MIN_SIGMA))


@pytest.mark.parametrize("kwargs,match", [
    ({"mu_rule": "median"}, "mu_rule must be one of"),
    ({"sigma_rule": "iqr"}, "sigma_rule must be one of"),
    ({"mu_rule": "quantile", "mu_quantile": 1.5}, "mu_quantile must lie in"),
    ({"sigma_rule": "std", "sigma_scale": 0.0}, "sigma_scale must be > 0"),
])
def test_adaptive_rule_rejects_bad_settings(kwargs, match):
  z1, z2 = (jnp.asarray(x) for x in _random_views())
  with pytest.raises(ValueError, match=match):
    losses.adaptive_mu_sigma(z1, z2, mu=0.5, sigma=1.0, **kwargs)


def test_config_validation_knows_the_adaptive_fields():
  config = config_defaults.base_config("image")
  config.loss.mu_rule = "quantile"
  config.loss.sigma_rule = "std"
  config_defaults.validate_config(config)
  config.loss.name = "infonce"
  with pytest.raises(ValueError, match="use --config.loss.name=adnce"):
    config_defaults.validate_config(config)
  config.loss.name = "adnce"
  config.loss.mu_quantile = 2.0
  with pytest.raises(ValueError, match="mu_quantile must be in"):
    config_defaults.validate_config(config)


# ------------------------------------------------------------------------- shared helpers


def test_method_specs_and_overrides():
  method = common.parse_method("adnce:sigma=1e6,mu_rule=quantile,data.classes_per_batch=2")
  assert dict(method.overrides) == {"loss.name": "adnce", "loss.sigma": 1e6,
                                    "loss.mu_rule": "quantile", "data.classes_per_batch": 2}
  assert method.label == "adnce (sigma=1e+06, mu_rule=quantile, data.classes_per_batch=2)"
  assert common.parse_method("infonce:use_labels=True,label=oracle").label == "oracle"
  config = common.load_config("configs/quickstart.py")
  changed = common.with_overrides(config, dict(method.overrides))
  assert changed.loss.sigma == 1e6 and config.loss.sigma == 1.0   # the original is untouched
  with pytest.raises(ValueError, match="did you mean 'sigma'"):
    common.with_overrides(config, {"loss.sigmma": 1.0})
  with pytest.raises(ValueError, match="expects a bool"):
    common.with_overrides(config, {"loss.use_labels": "maybe"})
  with pytest.raises(FileNotFoundError, match="--config configs/quickstart.py"):
    common.load_config("configs/no_such_config.py")


def test_mean_std_is_the_sample_std():
  values = [70.0, 72.0, 74.5]
  mean, std = common.mean_std(values)
  assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
  assert common.mean_std([3.0]) == (3.0, 0.0)
  assert common.fmt(values) == f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"
  # A seed without a score is counted in the cell, not silently dropped from it.
  assert common.fmt([*values, None]) == (
      f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} (n=3 of 4)")


def test_paired_difference_matches_the_textbook_paired_t_test():
  # Differences 1, 2, 3, 4 (seed 9 unpaired, None skipped): mean 2.5, sd sqrt(5/3), t = 3.873 on
  # 3 degrees of freedom; printed t tables give t_0.975(3) = 3.1824 and a two-sided p of 0.0305.
  d = common.paired_difference([71.0, 72.0, 73.0, 74.0, 80.0, None], [0, 1, 2, 3, 9, 4],
                               [70.0, 70.0, 70.0, 70.0, 60.0], [0, 1, 2, 3, 4])
  half = 3.182446 * np.sqrt(5 / 3) / 2
  assert d["n"] == 4 and d["mean"] == pytest.approx(2.5)
  assert (d["ci_low"], d["ci_high"]) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-5)
  assert d["p"] == pytest.approx(0.0305, abs=5e-4)
  assert (d["wins"], d["losses"]) == (4, 0)
  rows = [{"label": "InfoNCE", "score": [70.0, 70.0, 70.0, 70.0], "seeds": [0, 1, 2, 3]},
          {"label": "ADNCE", "score": [71.0, 72.0, 73.0, 74.0], "seeds": [0, 1, 2, 3]}]
  assert "| ADNCE | 4 | +2.50 |" in common.paired_table(rows, "InfoNCE", "linear probe top-1")
  assert common.paired_difference([1.0], [0], [0.0], [0]) is None   # one pair: no spread
  with pytest.raises(ValueError, match="repeat a seed"):          # seed 0 would count twice
    common.paired_difference([1.0, 2.0, 3.0], [0, 0, 1], [0.0, 0.0], [0, 1])


def test_run_identity_includes_where_the_data_are_and_reuse_names_the_code_version(
    tmp_path, capsys):
  config = common.load_config("configs/quickstart.py")
  config.data.source = "npz"
  a, b = (common.with_overrides(config, {"data.path": path}) for path in ("/data/a.npz",
                                                                          "/data/b.npz"))
  assert common.config_hash(a) != common.config_hash(b)   # another dataset, another run
  assert common.config_hash(a) == common.config_hash(       # bookkeeping is not identity
      common.with_overrides(a, {"log_every_steps": 7, "data.read_threads": 2}))
  # A finished run recorded by other code is reused with a note naming both versions.
  workdir = tmp_path / "run"
  workdir.mkdir()
  from cldro_jax import checkpointing  # pylint: disable=import-outside-toplevel
  (workdir / "config.json").write_text(json.dumps(checkpointing.config_to_dict(a)))
  (workdir / "results.json").write_text(json.dumps({"step": 1, "linear_probe_top1": 50.0}))
  (workdir / common.CODE_VERSION_FILE).write_text(json.dumps({"code_version": "0000000"}))
  results, _ = common.run_one(a, str(workdir))
  assert results["linear_probe_top1"] == 50.0
  assert "trained by code version 0000000" in capsys.readouterr().err
