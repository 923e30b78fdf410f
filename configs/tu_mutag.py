r"""MUTAG (TU): GIN + ADNCE in GraphCL's unsupervised setting, then the SVM evaluation.

Command (offline: MUTAG ships inside the `grakel` package; about 15 s on 2 CPU cores):
  python -m cldro_jax.main --config=configs/tu_mutag.py --workdir=workdirs/tu_mutag_adnce
  # InfoNCE: --config=configs/tu_mutag.py:loss=infonce ; another seed: :seed=3 ;
  # the reference code's augmentations: :aug_mode=faithful ; smoke run: :runlocal
  # all 20 runs (2 losses x 2 modes x 5 seeds) with a table and a plot: experiments/graph_mutag.py

Recipe (authors' scripts, docs/reproducing.md): GIN 3 x 32, Adam lr 0.01, batch 128, 20 epochs,
view 2 = random2 (node drop or subgraph, one per graph), ADNCE mu=0.7 sigma=1.0 t=0.15; seeds 0-4.
Scores: SVM (C by inner 5-fold CV) outer 10-fold CV accuracy of the original graphs' embeddings,
`svm_accuracy` in results.json, next to `untrained_svm_accuracy` (same protocol, untrained GIN).

Expected: GraphCL reports 86.80 +- 1.34 (mean +- std over 5 seeds); our 5-seed numbers for both
losses and both augmentation modes are in docs/results.md, "Graphs: MUTAG".
"""

from cldro_jax.tasks import graph


def get_config(arg=None):
  return graph.tu_config("MUTAG", arg)
