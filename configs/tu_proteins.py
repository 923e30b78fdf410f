r"""PROTEINS (TU): GIN + ADNCE in GraphCL's unsupervised setting, then the SVM evaluation.

Data: 1,113 protein graphs, one-hot node labels. Not bundled: the first run downloads the official
archive into $CLDRO_JAX_TU_DIR (default ~/.cache/cldro_jax/tu); offline it stops within seconds and
prints the manual command, i.e. on a machine with internet:
  mkdir -p ~/.cache/cldro_jax/tu && cd ~/.cache/cldro_jax/tu && \
      curl -LO https://www.chrsmrrs.com/graphkerneldatasets/PROTEINS.zip && \
      unzip PROTEINS.zip
(or point --config.data.data_dir at a folder holding PROTEINS/PROTEINS_A.txt etc.)

Command:
  python -m cldro_jax.main --config=configs/tu_proteins.py \
      --workdir=workdirs/tu_proteins_adnce
  # InfoNCE: :loss=infonce ; seeds 0-4: :seed=S ; the reference code's augmentations:
  # :aug_mode=faithful ; smoke run: :runlocal

Recipe (authors' scripts, docs/reproducing.md): GIN 3 x 32, Adam lr 0.01, batch 128, 20 epochs,
view 2 = random4 (node drop, edge perturbation, subgraph or attribute masking, one per graph);
ADNCE mu=1.5 sigma=1.0 t=0.05; seeds 0-4. Score: `svm_accuracy` in results.json (SVM outer 10-fold
CV accuracy of the original graphs' embeddings, percent), next to `untrained_svm_accuracy`.

Expected: GraphCL reports 74.39 +- 0.45 (mean +- std over 5 seeds). Not measured here yet (no
offline copy of PROTEINS).
"""

from cldro_jax.tasks import graph


def get_config(arg=None):
  return graph.tu_config("PROTEINS", arg)
