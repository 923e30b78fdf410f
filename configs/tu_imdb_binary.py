r"""IMDB-BINARY (TU): GIN + ADNCE in GraphCL's unsupervised setting, then the SVM evaluation.

Data: 1,000 movie ego-networks, no node labels (constant feature). Not bundled: the first run
downloads the official archive into $CLDRO_JAX_TU_DIR (default ~/.cache/cldro_jax/tu); offline it
stops within seconds and prints the manual command, i.e. on a machine with internet:
  mkdir -p ~/.cache/cldro_jax/tu && cd ~/.cache/cldro_jax/tu && \
      curl -LO https://www.chrsmrrs.com/graphkerneldatasets/IMDB-BINARY.zip && \
      unzip IMDB-BINARY.zip
(or point --config.data.data_dir at a folder holding IMDB-BINARY/IMDB-BINARY_A.txt etc.)

Command:
  python -m cldro_jax.main --config=configs/tu_imdb_binary.py \
      --workdir=workdirs/tu_imdb_binary_adnce
  # InfoNCE: :loss=infonce ; seeds 0-4: :seed=S ; the reference code's augmentations:
  # :aug_mode=faithful ; smoke run: :runlocal

Recipe (authors' scripts, docs/reproducing.md): GIN 3 x 32, Adam lr 0.01, batch 128, 20 epochs,
view 2 = random2 (node drop or subgraph, one per graph); ADNCE mu=0.7 sigma=1.0 t=0.55; seeds 0-4.
Score: `svm_accuracy` in results.json (SVM outer 10-fold CV accuracy of the original graphs'
embeddings, percent), next to `untrained_svm_accuracy`.

Expected: GraphCL reports 71.14 +- 0.44 (mean +- std over 5 seeds). Not measured here yet (no
offline copy of IMDB-BINARY).
"""

from cldro_jax.tasks import graph


def get_config(arg=None):
  return graph.tu_config("IMDB-BINARY", arg)
