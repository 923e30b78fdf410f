"""Contrastive losses of the CL-DRO paper as pure JAX functions.

    from cldro_jax import losses
    loss = losses.adnce(z1, z2, temperature=0.4, mu=0.7, sigma=0.5, variant="image")

``z1, z2`` are the raw (B, d) projections of the two views; rows are L2-normalised inside and
the scalar mean loss is returned. See ``docs/losses.md`` for the formulas, the reference code
each variant matches, the masking conventions and a ``jax.shard_map`` example.
"""
from cldro_jax.losses._common import VARIANTS, l2_normalize_rows
from cldro_jax.losses.adaptive import adaptive_mu_sigma
from cldro_jax.losses.contrastive import adnce, dcl, hcl, infonce, weighted_nce
from cldro_jax.losses.dro import chi2_dro, diagnostics, kl_dro, mean_variance
from cldro_jax.losses.registry import (
    Objective, get_objective, objective_names, register_objective)

# The training objectives of `--config.loss.name`: the paper's losses, then the CL-DRO family of
# its Section 3 (kl_dro: the KL ball at multiplier t; chi2_dro: the chi-square ball of radius
# eta; mean_variance: Theorem 3.5's approximation), so the theory's objectives can be trained and
# compared. DCL and HCL are defined in the image form only (as in the paper and their code).
register_objective("infonce", infonce, hyperparameters=("temperature",))
register_objective("adnce", adnce, hyperparameters=("temperature", "mu", "sigma"))
register_objective("dcl", dcl, hyperparameters=("temperature", "tau_plus"), variants=("image",))
register_objective("hcl", hcl, hyperparameters=("temperature", "tau_plus", "beta"),
                   variants=("image",))
register_objective("kl_dro", kl_dro, hyperparameters=("temperature",))
register_objective("chi2_dro", chi2_dro, hyperparameters=("eta",))
register_objective("mean_variance", mean_variance, hyperparameters=("temperature",))

__all__ = [
    "Objective",
    "VARIANTS",
    "adaptive_mu_sigma",
    "adnce",
    "chi2_dro",
    "dcl",
    "diagnostics",
    "get_objective",
    "hcl",
    "infonce",
    "kl_dro",
    "l2_normalize_rows",
    "mean_variance",
    "objective_names",
    "register_objective",
    "weighted_nce",
]
