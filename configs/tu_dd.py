r"""DD (TU): GIN + ADNCE in GraphCL's unsupervised setting, then the SVM evaluation.

Data: 1,178 protein structures (large graphs, ~284 nodes on average), one-hot node labels. Not
bundled: the first run downloads the official archive into $CLDRO_JAX_TU_DIR (default
~/.cache/cldro_jax/tu); offline it stops within seconds and prints the manual command, i.e. on a
machine with internet:
  mkdir -p ~/.cache/cldro_jax/tu && cd ~/.cache/cldro_jax/tu && \
      curl -LO https://www.chrsmrrs.com/graphkerneldatasets/DD.zip && \
      unzip DD.zip
(or point --config.data.data_dir at a folder holding DD/DD_A.txt etc.)

Command:
  python -m cldro_jax.main --config=configs/tu_dd.py \
      --workdir=workdirs/tu_dd_adnce
  # InfoNCE: :loss=infonce ; seeds 0-4: :seed=S ; the reference code's augmentations:
  # :aug_mode=faithful ; smoke run: :runlocal

Recipe (authors' scripts, docs/reproducing.md): GIN 3 x 32, Adam lr 0.01, batch 128, 20 epochs,
view 2 = random2 (node drop or subgraph, one per graph); ADNCE mu=0.2 sigma=1.0 t=0.2; seeds 0-4.
Score: `svm_accuracy` in results.json (SVM outer 10-fold CV accuracy of the original graphs'
embeddings, percent), next to `untrained_svm_accuracy`.

Expected: GraphCL reports 78.62 +- 0.40 (mean +- std over 5 seeds). Not measured here yet (no
offline copy of DD).
"""

from cldro_jax.tasks import graph


def get_config(arg=None):
  return graph.tu_config("DD", arg)
