"""Float64 NumPy transcription of /work/shared/reference/LOSSES.md, the tests' ground truth.

Written from the formulas, independently of cldro_jax.losses: one anchor at a time, explicit
candidate lists, the plain (not log-domain) expressions of the reference code. float64 keeps
exp(1/t) finite for every temperature the tests use (t >= 0.01). Conventions shared with the
library by specification (docs/losses.md): an all-zero row stays zero after normalisation;
invalid rows are neither anchors nor negatives; with labels, same-label candidates other than
the positive are not negatives; an anchor without negatives is left out of the mean, and the
mean of no anchors is 0.
"""
from __future__ import annotations

import numpy as np


def normalize(z):
  z = np.asarray(z, np.float64)
  norms = np.linalg.norm(z, axis=1, keepdims=True)
  return np.divide(z, norms, out=np.zeros_like(z), where=norms > 0)


def gaussian(s, mu, sigma):
  # The 1/(sigma sqrt(2 pi)) factor of the reference code is kept: it cancels in w.
  return np.exp(-(s - mu) ** 2 / (2.0 * sigma ** 2)) / (sigma * np.sqrt(2.0 * np.pi))


def _is_valid(valid, b):
  return True if valid is None else bool(valid[b])


def _same_label(labels, a, b):
  # a negative label is an unlabelled row: the same class as nothing
  return labels is not None and labels[a] == labels[b] and labels[a] >= 0


def anchors(z1, z2, variant, valid=None, labels=None, include_positive=False):
  """For every valid anchor: (positive cosine, cosines of its candidate set).

  image: 2B anchors over concat(z1, z2), candidates all j except i and its pair.
  sentence/graph: anchor z1_i, candidates z2_j with j != i; with include_positive (SimCSE's
  set) the positive j = i is the first entry of the candidate list.
  """
  z1, z2 = normalize(z1), normalize(z2)
  batch = z1.shape[0]
  out = []
  if variant == "image":
    z = np.concatenate([z1, z2])
    cos = z @ z.T
    for i in range(2 * batch):
      if not _is_valid(valid, i % batch):
        continue
      pair = (i + batch) % (2 * batch)
      negs = [j for j in range(2 * batch)
              if j not in (i, pair) and _is_valid(valid, j % batch)
              and not _same_label(labels, i % batch, j % batch)]
      out.append((cos[i, pair], cos[i, negs]))
  else:
    cos = z1 @ z2.T
    for i in range(batch):
      if not _is_valid(valid, i):
        continue
      cands = [i] if include_positive else []
      cands += [j for j in range(batch)
                if j != i and _is_valid(valid, j) and not _same_label(labels, i, j)]
      out.append((cos[i, i], cos[i, cands]))
  return out


def _mean_over_anchors(per_anchor):
  return float(np.mean(per_anchor)) if per_anchor else 0.0


def weighted_nce(z1, z2, *, t, variant, mu=None, sigma=None, valid=None, labels=None,
                 weights_from=None, weight_fn=None):
  """InfoNCE (mu=None) or ADNCE of LOSSES.md, in the variant's form.

  weights_from: optional (z1, z2) at which ADNCE's weights are computed (default: the inputs).
  Finite differences of the stop-gradient weights hold them at the unperturbed point.
  weight_fn: optional cosines -> unnormalised weights, replacing ADNCE's Gaussian.
  """
  losses = []
  in_set = variant == "sentence"
  rows = anchors(z1, z2, variant, valid, labels, include_positive=in_set)
  weight_rows = rows if weights_from is None else anchors(
      *weights_from, variant, valid, labels, include_positive=in_set)
  for (s_pos, cands), (_, weight_cands) in zip(rows, weight_rows, strict=True):
    n_negatives = len(cands) - (1 if in_set else 0)
    if n_negatives == 0:
      continue
    if weight_fn is not None:
      w = weight_fn(weight_cands)
    else:
      w = np.ones_like(cands) if mu is None else gaussian(weight_cands, mu, sigma)
    w = w / w.mean()
    pos = np.exp(s_pos / t)
    weighted = w * np.exp(cands / t)
    if variant == "image":
      losses.append(-np.log(pos / (pos + weighted.sum())))
    elif variant == "sentence":
      losses.append(-np.log(pos / weighted.sum()))
    else:
      losses.append(-np.log(pos / weighted.mean()))
  return _mean_over_anchors(losses)


def graphcl_infonce(z1, z2, *, t):
  """GraphCL's own form -log(pos / sum_{j != i} exp(s_ij / t)), without any mean over j."""
  losses = [-np.log(np.exp(s / t) / np.exp(c / t).sum()) for s, c in anchors(z1, z2, "graph")]
  return _mean_over_anchors(losses)


def hcl(z1, z2, *, t, tau_plus, beta, valid=None, labels=None):
  """HCL of Robinson et al. as in the reference code (beta = 0: DCL), image form."""
  losses = []
  for s_pos, negs in anchors(z1, z2, "image", valid, labels):
    n = len(negs)
    if n == 0:
      continue
    pos = np.exp(s_pos / t)
    neg = np.exp(negs / t)
    imp = np.exp(beta * negs / t)
    reweight = (imp * neg).sum() / imp.mean()
    ng = (-tau_plus * n * pos + reweight) / (1.0 - tau_plus)
    ng = max(ng, n * np.exp(-1.0 / t))
    losses.append(-np.log(pos / (pos + ng)))
  return _mean_over_anchors(losses)


def hcl_clamp_active(z1, z2, *, t, tau_plus, beta):
  """Fraction of anchors whose DCL/HCL estimate is replaced by the clamp N e^{-1/t}."""
  active = []
  for s_pos, negs in anchors(z1, z2, "image"):
    n = len(negs)
    imp = np.exp(beta * negs / t)
    reweight = (imp * np.exp(negs / t)).sum() / imp.mean()
    ng = (-tau_plus * n * np.exp(s_pos / t) + reweight) / (1.0 - tau_plus)
    active.append(ng < n * np.exp(-1.0 / t))
  return float(np.mean(active))


def _dro_anchors(z1, z2, variant, valid, labels):
  return [(s, c) for s, c in anchors(z1, z2, variant, valid, labels) if len(c)]


def kl_dro(z1, z2, *, t, variant, valid=None, labels=None):
  return _mean_over_anchors([-s + t * np.log(np.mean(np.exp(c / t)))
                             for s, c in _dro_anchors(z1, z2, variant, valid, labels)])


def chi2_dro(z1, z2, *, eta, variant, valid=None, labels=None):
  return _mean_over_anchors([-s + c.mean() + np.sqrt(eta * c.var())
                             for s, c in _dro_anchors(z1, z2, variant, valid, labels)])


def mean_variance(z1, z2, *, t, variant, valid=None, labels=None):
  return _mean_over_anchors([-s + c.mean() + c.var() / (2.0 * t)
                             for s, c in _dro_anchors(z1, z2, variant, valid, labels)])


def _ess(w):
  return w.sum() ** 2 / (len(w) * (w ** 2).sum())


def diagnostics(z1, z2, *, t, mu=None, sigma=None, variant="image", valid=None, labels=None):
  """The statistics of losses.diagnostics, one explicit weight vector per anchor."""
  rows = _dro_anchors(z1, z2, variant, valid, labels)
  out = {
      "eta_hat": np.mean([c.var() / (2 * t ** 2) for _, c in rows]),
      "ess_infonce": np.mean([_ess(np.exp(c / t) / np.exp(c / t).sum()) for _, c in rows]),
      "s_neg_mean": np.mean([c.mean() for _, c in rows]),
      "s_neg_var": np.mean([c.var() for _, c in rows]),
      "s_pos_mean": np.mean([s for s, _ in rows]),
  }
  mi = []
  for s, c in rows:   # InfoNCE's bound, positive in the denominator for every variant
    k, denominator = len(c) + 1, np.exp(s / t) + np.exp(c / t).sum()
    mi.append(np.log(k) - (-np.log(np.exp(s / t) / denominator)))
  out["mi_lower_bound"] = np.mean(mi)
  if mu is not None:
    weights = []
    for s, c in rows:
      cands = np.concatenate([[s], c]) if variant == "sentence" else c
      g = gaussian(cands, mu, sigma)
      weights.append(g / g.mean())
    out["ess_adnce"] = np.mean([_ess(w) for w in weights])
    out["adnce_w_max"] = max(w.max() for w in weights)
    out["adnce_w_min"] = min(w.min() for w in weights)
    out["adnce_w_mean"] = np.mean([w.mean() for w in weights])
  return {k: float(v) for k, v in out.items()}


def numeric_grad(fn, z1, z2, eps=1e-6):
  """Central finite differences of a scalar fn(z1, z2) in float64, for both inputs."""
  grads = []
  for which in range(2):
    base = [np.array(z1, np.float64), np.array(z2, np.float64)]
    grad = np.zeros_like(base[which])
    for idx in np.ndindex(*grad.shape):
      plus = [b.copy() for b in base]
      minus = [b.copy() for b in base]
      plus[which][idx] += eps
      minus[which][idx] -= eps
      grad[idx] = (fn(*plus) - fn(*minus)) / (2 * eps)
    grads.append(grad)
  return grads
