r"""Unsupervised SimCSE with ADNCE on RoBERTa-base (the paper's sentence setting).

Command:
  python -m cldro_jax.main --config=configs/sts_roberta.py --workdir=workdirs/sts_roberta_adnce \
      --config.model.path=models/roberta-base \
      --config.data.path=data/wiki1m_for_simcse.txt \
      --config.data.sts_root=SentEval/data/downstream
  # SimCSE baseline (InfoNCE, t=0.05): --config=configs/sts_roberta.py:loss=infonce
  # offline smoke run on CPU (MiniLM + scikit-learn text, same code path): :runlocal
  # evaluate a run again: python -m cldro_jax.evaluators.sts --workdir=workdirs/sts_roberta_adnce

Data and model (fetch once, with the internet):
  huggingface-cli download roberta-base --local-dir models/roberta-base
      (needs model.safetensors: pass `--include "*.json" "*.txt" "*.safetensors"`)
  wget https://huggingface.co/datasets/princeton-nlp/datasets-for-simcse/resolve/main/wiki1m_for_simcse.txt -P data/
  git clone https://github.com/facebookresearch/SentEval && \
      (cd SentEval/data/downstream && bash get_transfer_data.bash)   # STS12-16, STS-B, SICK-R

Recipe (docs/reproducing.md): as configs/sts_bert.py (1 epoch of wiki1m, length 32, AdamW with
linear decay, no warm-up, weight decay 0, gradient clipping 1.0, CLS + MLP in training and CLS
without it at evaluation, STS-B dev every 125 steps keeping the best) with batch 512, lr 1e-5 and
ADNCE t=0.06, mu=2.0, sigma=1.0 (mu > 1: the weight grows monotonically with the similarity).

Expected (STS avg Spearman x100, 7 tasks, "all" setting): SimCSE-RoBERTa-base 76.57;
reproductions commonly 73.5-75.
"""

from cldro_jax import config_defaults
from cldro_jax.tasks import sentence


def get_config(arg=None):
  arg = config_defaults.parse_arg(arg, runlocal=False, loss="adnce")
  config = config_defaults.base_config("sentence")
  config.seed = 42                      # Hugging Face TrainingArguments' default seed
  config.model.path = "models/roberta-base"
  config.model.pooler = "cls_mlp"
  config.model.mlp_init = "fresh"
  config.model.dtype = "bfloat16"
  config.data.source = "file"
  config.data.path = "data/wiki1m_for_simcse.txt"
  config.data.max_length = 32
  config.data.sts_root = "SentEval/data/downstream"
  config.batch_size = 512
  config.total_epochs = 1.0
  config.log_every_steps = 25
  config.checkpoint_every_steps = 500
  config.loss.name = arg.loss
  config.loss.temperature = 0.06 if arg.loss == "adnce" else 0.05
  config.loss.mu = 2.0
  config.loss.sigma = 1.0
  config.optim.name = "adamw"
  config.optim.lr = 1e-5
  config.optim.weight_decay = 0.0
  config.optim.schedule = "linear_decay"
  config.optim.warmup_epochs = 0.0
  config.optim.grad_clip_norm = 1.0
  config.eval.every_steps = 125
  config.eval.dev_tasks = ("STSBenchmark",)
  config.eval.keep_best = True
  if arg.runlocal:
    sentence.make_runlocal(config)
  return config
