r"""Unsupervised SimCSE with ADNCE on BERT-base-uncased (the paper's sentence setting).

Command:
  python -m cldro_jax.main --config=configs/sts_bert.py --workdir=workdirs/sts_bert_adnce \
      --config.model.path=models/bert-base-uncased \
      --config.data.path=data/wiki1m_for_simcse.txt \
      --config.data.sts_root=SentEval/data/downstream
  # SimCSE baseline (InfoNCE, t=0.05): --config=configs/sts_bert.py:loss=infonce
  # offline smoke run on CPU (MiniLM + scikit-learn text, same code path): :runlocal
  # evaluate a run again: python -m cldro_jax.evaluators.sts --workdir=workdirs/sts_bert_adnce

Data and model (fetch once, with the internet):
  huggingface-cli download bert-base-uncased --local-dir models/bert-base-uncased
      (needs model.safetensors: pass `--include "*.json" "*.txt" "*.safetensors"`)
  wget https://huggingface.co/datasets/princeton-nlp/datasets-for-simcse/resolve/main/wiki1m_for_simcse.txt -P data/
  git clone https://github.com/facebookresearch/SentEval && \
      (cd SentEval/data/downstream && bash get_transfer_data.bash)   # STS12-16, STS-B, SICK-R

Recipe (docs/reproducing.md; SimCSE's run_unsup_example.sh through the Hugging Face Trainer): 1
epoch over the 1M sentences, batch 64, length 32, AdamW lr 3e-5 with linear decay and no warm-up,
weight decay 0 (TrainingArguments' default; a positive one spares biases and LayerNorm weights,
as the Trainer), gradient norm clipped at 1.0 (TrainingArguments' max_grad_norm), CLS + MLP in
training, CLS without the MLP at evaluation, STS-B dev every 125 steps keeping the best model;
ADNCE t=0.07, mu=0.4, sigma=1.0. Compute in bfloat16 (SimCSE trains with fp16 autocast).

Expected (STS avg Spearman x100 over STS12-16, STS-B, SICK-R, "all" setting): SimCSE-BERT-base
76.25 (STS12 68.40, STS13 82.41, STS14 74.38, STS15 80.91, STS16 78.56, STS-B 76.85, SICK-R
72.23); reproductions commonly 73.5-75; ADNCE-BERT about 74.6 in the paper's own runs.
"""

from cldro_jax import config_defaults
from cldro_jax.tasks import sentence


def get_config(arg=None):
  arg = config_defaults.parse_arg(arg, runlocal=False, loss="adnce")
  config = config_defaults.base_config("sentence")
  config.seed = 42                      # Hugging Face TrainingArguments' default seed
  config.model.path = "models/bert-base-uncased"
  config.model.pooler = "cls_mlp"
  config.model.mlp_init = "fresh"
  config.model.dtype = "bfloat16"
  config.data.source = "file"
  config.data.path = "data/wiki1m_for_simcse.txt"
  config.data.max_length = 32
  config.data.sts_root = "SentEval/data/downstream"
  config.batch_size = 64
  config.total_epochs = 1.0
  config.log_every_steps = 25
  config.checkpoint_every_steps = 1000
  config.loss.name = arg.loss
  config.loss.temperature = 0.07 if arg.loss == "adnce" else 0.05
  config.loss.mu = 0.4
  config.loss.sigma = 1.0
  config.optim.name = "adamw"
  config.optim.lr = 3e-5
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
