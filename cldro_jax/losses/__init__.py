"""Contrastive losses of the CL-DRO paper as pure JAX functions.

    from cldro_jax import losses
    loss = losses.adnce(z1, z2, temperature=0.4, mu=0.7, sigma=0.5, variant="image")

``z1, z2`` are the raw (B, d) projections of the two views; rows are L2-normalised inside and
the scalar mean loss is returned. See ``docs/losses.md`` for the formulas, the reference code
each variant matches, the masking conventions and a ``jax.shard_map`` example.
"""
from cldro_jax.losses._common import VARIANTS, l2_normalize_rows
from cldro_jax.losses.adaptive import adaptive_mu_sigma
from cldro_jax.losses.contrastive import adnce, dcl, hcl, infonce
from cldro_jax.losses.dro import chi2_dro, diagnostics, kl_dro, mean_variance

__all__ = [
    "VARIANTS",
    "adaptive_mu_sigma",
    "adnce",
    "chi2_dro",
    "dcl",
    "diagnostics",
    "hcl",
    "infonce",
    "kl_dro",
    "l2_normalize_rows",
    "mean_variance",
]
