"""The graph task: GraphCL's unsupervised TU setting (GIN + projection head, SVM evaluation).

As the paper's graph code (ADNCE `graph/gsimclr_robust.py`, built on GraphCL):
- view 1 is the ORIGINAL graph, view 2 an augmentation of it (``config.data.aug``: ``random2`` =
  {node drop, subgraph}, ``random3`` adds edge perturbation, ``random4`` adds attribute masking;
  one is drawn per graph), made on the host (`cldro_jax.data.graphs`);
- each view is its own forward pass (BatchNorm statistics per view, running averages updated
  twice per step, view 1 first), the loss is the "graph" form: anchors = view-1 rows, candidates
  = view-2 rows, positive excluded, MEAN over the negatives (`losses.adnce(..., variant="graph")`);
- every graph is visited once per epoch, the last partial batch included (padded slots are
  ``valid=False`` in the loss); Adam lr 0.01, batch 128, 20 epochs (see `tu_config`);
- evaluation: graph embeddings (concatenated per-layer sum pooling, 96-d) of the original graphs
  with BatchNorm in eval mode, an RBF SVC with C chosen by an inner 5-fold CV, outer stratified
  10-fold CV (`cldro_jax.evaluators.svm_cv`); the untrained encoder is scored the same way.

Sharding (why the batch looks the way it does). A padded graph batch is a set of node, edge and
graph arrays whose edges index node rows. Sharding one globally packed batch over ``"data"``
would cut the node array at arbitrary rows: a device's edges would point at nodes held by other
devices, and the message passing would need all-gathers of the node states at every layer.
Instead each global batch is packed PER DEVICE: device d gets graph slots ``[d * G_d, (d + 1) *
G_d)`` of the global order (G_d = batch_size / devices), packed into its own block of fixed size
(a per-device budget: N_d node rows, E_d edge rows, G_d graph slots) with LOCAL node and slot
ids. The blocks are concatenated along axis 0, so the global arrays are ``(D * N_d, F)``,
``(D * E_d,)``, ``(D * G_d,)`` and sharding axis 0 over ``"data"`` hands each device exactly its
block. The GIN runs inside `jax.shard_map` on the local block: gathers and segment sums never
leave the device. BatchNorm statistics must be those of all real nodes of the global batch (as
one big device would compute them); `MaskedBatchNorm(axis_name="data")` psums the per-device
sums and counts (not per-device means: devices hold different numbers of real nodes). Global
graph slot ``d * G_d + k`` is the same graph for any number of devices, so the projections, the
loss (negatives gathered from every device) and the update equal the 1-device step.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cldro_jax import config_defaults
from cldro_jax.data import graph_augment
from cldro_jax.data import graphs as graphs_lib
from cldro_jax.data import pipeline
from cldro_jax.evaluators import device_outputs
from cldro_jax.evaluators import svm_cv
from cldro_jax.models import gin
from cldro_jax import tasks as tasks_lib
from cldro_jax.tasks import ForwardOutput

AXIS = "data"
AUGMENTATIONS = ("none", *graph_augment.SINGLE_AUGMENTATIONS, *graph_augment.MIXTURES)

# The paper's eight TU datasets: augmentation, mu, sigma, temperature (from the
# authors' scripts) and GraphCL's published SVM accuracy in percent (mean, std over 5 seeds;
# GraphCL, You et al. 2020, unsupervised TU table; None where the std was not checked here).
PAPER_SETTINGS = {
    "NCI1": dict(aug="random3", mu=0.7, sigma=1.0, temperature=0.05, graphcl=(77.87, 0.41)),
    "PROTEINS": dict(aug="random4", mu=1.5, sigma=1.0, temperature=0.05, graphcl=(74.39, 0.45)),
    "DD": dict(aug="random2", mu=0.2, sigma=1.0, temperature=0.2, graphcl=(78.62, 0.40)),
    "MUTAG": dict(aug="random2", mu=0.7, sigma=1.0, temperature=0.15, graphcl=(86.80, 1.34)),
    "COLLAB": dict(aug="random4", mu=0.3, sigma=1.0, temperature=0.1, graphcl=(71.36, 1.15)),
    "REDDIT-BINARY": dict(aug="random2", mu=0.3, sigma=1.0, temperature=0.15,
                          graphcl=(89.53, 0.84)),
    "REDDIT-MULTI-5K": dict(aug="random2", mu=0.8, sigma=1.0, temperature=0.15,
                            graphcl=(55.99, None)),
    "IMDB-BINARY": dict(aug="random2", mu=0.7, sigma=1.0, temperature=0.55,
                        graphcl=(71.14, 0.44)),
}


def defaults() -> ml_collections.ConfigDict:
  """The graph part of the config schema (data, model, eval), with defaults."""
  data = ml_collections.ConfigDict(dict(
      name="MUTAG",            # TU dataset name (file prefix), e.g. NCI1, PROTEINS, REDDIT-BINARY
      # Cache/root folder of the TU files, <data_dir>/<name>/<name>_A.txt; "" = $CLDRO_JAX_TU_DIR
      # or ~/.cache/cldro_jax/tu.
      data_dir="",
      source="auto",           # auto (local, else grakel's MUTAG, else download) | local | grakel
                               # | download
      download=True,           # in "auto": may a missing dataset be downloaded
      use_node_attributes=False,   # PyG use_node_attr (the reference: False)
      node_features="auto",    # auto (one-hot labels, else constant 1) | constant
      aug="random2",           # view 2: none | drop_nodes | subgraph | perturb_edges |
                               # mask_attributes | random2 | random3 | random4
      aug_mode="proper",       # proper (what the names promise) | faithful (the reference's code)
      # Node/edge budget of a per-device block: 0 = the guaranteed bound (sum of the G_d largest
      # graphs); q in (0, 1] = G_d x quantile_q(size), smaller arrays for heavy-tailed datasets
      # (REDDIT), but a batch that does not fit raises with the fix.
      budget_quantile=0.0,
      prefetch=2,              # host batches prepared ahead in a background thread (0 = inline)
  ))
  model = ml_collections.ConfigDict(dict(
      num_layers=3,
      hidden=32,
      dtype="float32",         # compute dtype: float32 | bfloat16 (parameters stay float32)
  ))
  evaluation = ml_collections.ConfigDict(dict(
      every_epochs=0,          # SVM monitor every this many epochs (0: only the final evaluation)
      svm_seeds=1,             # CV repetitions; repetition r shuffles the outer folds with seed+r
      folds=10,                # outer stratified folds
      inner_folds=5,           # inner CV choosing C
      batch_size=512,          # graphs per evaluation forward pass (rounded up to the devices)
      untrained_baseline=True, # also score the untrained encoder (same seed, same protocol)
  ))
  return ml_collections.ConfigDict(dict(data=data, model=model, eval=evaluation))


def tu_config(name: str, arg: str | None) -> ml_collections.ConfigDict:
  """A config of GraphCL's unsupervised TU recipe for dataset ``name`` (``configs/tu_*.py``).

  ``arg``: ``runlocal`` (seconds-long smoke run), ``seed=S``, ``loss=adnce|infonce``,
  ``aug_mode=proper|faithful``. The dataset's aug / mu / sigma / t are `PAPER_SETTINGS`.
  """
  if name not in PAPER_SETTINGS:
    raise ValueError(f"No paper settings for {name!r}; known: {sorted(PAPER_SETTINGS)}.")
  arg = config_defaults.parse_arg(arg, runlocal=False, seed=0, loss="adnce", aug_mode="proper")
  settings = PAPER_SETTINGS[name]
  config = config_defaults.base_config("graph")
  config.seed = arg.seed                   # the reference runs seeds 0..4
  config.data.name = name
  config.data.aug = settings["aug"]
  config.data.aug_mode = arg.aug_mode
  config.batch_size = 128
  config.total_epochs = 20
  # A GIN step on these small graphs takes milliseconds: a log line (a device fetch and two
  # file flushes) every step would stall the host and the device at every one of them.
  config.log_every_steps = 10
  config.checkpoint_every_steps = 1000
  config.loss.name = arg.loss
  config.loss.temperature = settings["temperature"]
  config.loss.mu = settings["mu"]
  config.loss.sigma = settings["sigma"]
  config.optim.name = "adam"
  config.optim.lr = 0.01
  config.optim.weight_decay = 0.0          # torch.optim.Adam's default, as the reference
  config.optim.schedule = "constant"
  config.model.num_layers = 3
  config.model.hidden = 32
  config.eval.every_epochs = 10            # the reference logs the SVM accuracy at epochs 10, 20
  if arg.runlocal:
    make_runlocal(config)
  return config


def make_runlocal(config: ml_collections.ConfigDict) -> None:
  """Shrinks a graph config to seconds on a laptop CPU: same code path, a few steps."""
  config.batch_size = 32
  config.total_steps = 4
  config.log_every_steps = 1   # a line per step of the smoke run
  config.checkpoint_every_steps = 2
  config.eval.every_epochs = 0
  config.eval.batch_size = 64
  config.progress_bar = False


def validate(config: ml_collections.ConfigDict) -> None:
  """Graph-specific values `config_defaults.validate_config` does not know about."""
  problems = []
  data, ev = config.data, config.eval
  if data.aug not in AUGMENTATIONS:
    problems.append(f"config.data.aug={data.aug!r} is not one of {AUGMENTATIONS}")
  if data.aug_mode not in graph_augment.MODES:
    problems.append(f"config.data.aug_mode={data.aug_mode!r} is not one of "
                    f"{graph_augment.MODES}")
  if not 0.0 <= data.budget_quantile <= 1.0:
    problems.append(f"config.data.budget_quantile must be 0 (guaranteed budget) or in (0, 1], "
                    f"got {data.budget_quantile}")
  if config.model.dtype not in ("float32", "bfloat16"):
    problems.append("config.model.dtype must be float32 or bfloat16")
  if config.model.num_layers < 1 or config.model.hidden < 1:
    problems.append("config.model.num_layers and config.model.hidden must be >= 1")
  if ev.svm_seeds < 1 or ev.folds < 2 or ev.inner_folds < 2:
    problems.append("config.eval.svm_seeds must be >= 1, folds and inner_folds >= 2")
  if ev.batch_size < 1 or ev.every_epochs < 0:
    problems.append("config.eval.batch_size must be >= 1 and every_epochs >= 0")
  if problems:
    raise ValueError("Invalid graph config:\n  " + "\n  ".join(problems))


def build_model(model_cfg: ml_collections.ConfigDict, dtype: str | None = None) -> gin.GIN:
  """The config's GIN; `dtype` replaces its compute dtype (evaluation runs in float32)."""
  dtype = jnp.bfloat16 if (dtype or model_cfg.dtype) == "bfloat16" else jnp.float32
  # BatchNorm reduces its sums over "data": the model always runs inside shard_map (see module).
  return gin.GIN(num_layers=model_cfg.num_layers, hidden=model_cfg.hidden, bn_axis_name=AXIS,
                 dtype=dtype)


def empty_block(budget: graphs_lib.GraphBudget, feature_dim: int) -> graphs_lib.GraphBatch:
  """A per-device block holding no graph (every mask False), in `pack_graphs`' padding layout.

  The last global batch of an epoch may leave whole devices without a graph.
  """
  n, e, g = budget
  return graphs_lib.GraphBatch(
      node_features=np.zeros((n, feature_dim), np.float32),
      senders=np.full((e,), n - 1, np.int32), receivers=np.full((e,), n - 1, np.int32),
      node_graph=np.full((n,), g - 1, np.int32), node_mask=np.zeros((n,), bool),
      edge_mask=np.zeros((e,), bool), graph_mask=np.zeros((g,), bool),
      labels=np.full((g,), -1, np.int32))


def concat_blocks(blocks: list[graphs_lib.GraphBatch]) -> graphs_lib.GraphBatch:
  """Per-device blocks stacked along axis 0 (ids stay local to each block)."""
  return graphs_lib.GraphBatch(*(np.concatenate(parts) for parts in zip(*blocks, strict=True)))


def local_device_positions(mesh: jax.sharding.Mesh) -> list[int]:
  """Positions along "data" of this process's devices (contiguous, as the batch layout needs)."""
  positions = [i for i, d in enumerate(mesh.devices.flat)
               if d.process_index == jax.process_index()]
  if positions != list(range(positions[0], positions[0] + len(positions))):
    raise ValueError(f"This process's devices sit at mesh positions {positions}; the graph "
                     "batch layout needs each process's devices to be contiguous on the mesh.")
  return positions


def sharded_apply(model: gin.GIN, mesh: jax.sharding.Mesh, params, model_state,
                  batch: graphs_lib.GraphBatch, *, train: bool):
  """(embeddings (G, L * hidden), projections (G, L * hidden), model_state) of a batch packed per
  device (see the module docstring); each device runs the GIN on its own block."""

  def local(params, model_state, block):
    variables = {"params": params, **model_state}
    if train:
      (emb, z), updates = model.apply(variables, block, train=True,
                                      mutable=list(model_state.keys()))
      return emb, z, {**model_state, **updates}
    emb, z = model.apply(variables, block, train=False)
    return emb, z, model_state

  # Running statistics come from psum-ed sums: identical on every device, hence P().
  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(AXIS)),
                       out_specs=(P(AXIS), P(AXIS), P()))(params, model_state, batch)


# Module-level, with the model and mesh static: every task (and every run of an experiment in one
# process) with the same network and mesh shares one compiled evaluation function.
jitted_apply = jax.jit(sharded_apply, static_argnums=(0, 1), static_argnames=("train",))


class GraphTask:
  """Contrastive pre-training on TU graphs (see the module docstring)."""

  loss_variant = "graph"
  example_unit = "graph"
  probe_shape = None          # no online probe: graphs are scored by the SVM evaluation

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    validate(config)
    self.config = config
    self.mesh = mesh
    self.data_sharding = NamedSharding(mesh, P(AXIS))
    self.replicated = NamedSharding(mesh, P())
    data = config.data
    try:
      self.dataset = graphs_lib.load_tu_dataset(
          data.name, root=data.data_dir or None, source=data.source, download=data.download,
          use_node_attributes=data.use_node_attributes, node_features=data.node_features)
    except (FileNotFoundError, ConnectionError) as err:
      # The loader names the files and the download command; add the config knob. Either way
      # the dataset is missing here (a failed download included): one kind of error, which the
      # command line shows as its message alone.
      raise FileNotFoundError(f"{err} Or point --config.data.data_dir at a folder holding "
                              f"{data.name}/{data.name}_A.txt etc.") from err
    self.graphs = self.dataset.graphs
    self.feature_dim = int(self.graphs[0].node_features.shape[1])
    num_graphs, devices = len(self.graphs), mesh.size
    if num_graphs < 2:
      raise ValueError(f"{data.name} has {num_graphs} graph(s); contrastive training needs >= 2.")
    self.per_device = config.batch_size // devices     # the trainer checked divisibility
    # Every graph once per epoch, the last partial batch included, as the reference's loader.
    self.steps_per_epoch = math.ceil(num_graphs / config.batch_size)
    self.monitor_every_steps = config.eval.every_epochs * self.steps_per_epoch
    quantile = data.budget_quantile or None
    self.budget = graphs_lib.view_budget(self.graphs, self.per_device, data.aug_mode,
                                         quantile=quantile)
    self.eval_per_device = math.ceil(config.eval.batch_size / devices)
    self.eval_budget = graphs_lib.view_budget(self.graphs, self.eval_per_device, data.aug_mode,
                                              quantile=quantile)
    if quantile is not None:
      self._check_eval_batches_fit(quantile)
    self.local_positions = local_device_positions(mesh)
    self.model = build_model(config.model)
    # The SVM's embeddings in float32 whatever the training dtype (as the sentence task's): the
    # score of the same weights must not depend on the dtype that trained them.
    self.eval_model = build_model(config.model, dtype="float32")
    self.model_name = f"gin-l{config.model.num_layers}-h{config.model.hidden}"
    # SVM accuracies of the trained encoder by (step, CV seed): the trainer runs the monitor at
    # the last step and then final_evaluation, which would otherwise repeat the same CV.
    self._trained_scores: dict[tuple[int, int], tuple[float, float]] = {}
    self._embedded: tuple[int, np.ndarray, np.ndarray] | None = None   # (step, emb, labels)

  def _check_eval_batches_fit(self, quantile: float) -> None:
    """The evaluation's batches are fixed (dataset order): with a quantile budget, check them
    now rather than fail in the first evaluation, after training."""
    views = [graphs_lib.view_one(g, self.config.data.aug_mode) for g in self.graphs]
    starts = np.arange(0, len(views), self.eval_per_device)
    for what, counts, limit in (
        ("nodes", [g.num_nodes for g in views], self.eval_budget.max_nodes),
        ("edges", [g.num_edges for g in views], self.eval_budget.max_edges)):
      sums = np.add.reduceat(np.asarray(counts, np.int64), starts)
      if sums.max() > limit:
        raise ValueError(
            f"config.data.budget_quantile={quantile} gives evaluation batches room for {limit} "
            f"{what}, but the batch of graphs {int(starts[sums.argmax()])}.. holds "
            f"{int(sums.max())}. Use --config.data.budget_quantile=0 (the guaranteed budget) or "
            "a value closer to 1.")

  def data_fingerprint(self) -> str:
    sample = [self.graphs[i] for i in tasks_lib.sample_positions(len(self.graphs))]
    return tasks_lib.data_digest(
        len(self.graphs), *[part for g in sample for part in (g.node_features, g.edge_index,
                                                              int(g.label))])

  # -- model ------------------------------------------------------------------------------------

  def _dummy_batch(self) -> graphs_lib.GraphBatch:
    return empty_block(graphs_lib.GraphBudget(8, 8, 2), self.feature_dim)

  def init(self, rng):
    variables = self.model.init(rng, self._dummy_batch(), train=False)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return params, model_state

  def forward(self, params, model_state, batch, rng, *, train: bool) -> ForwardOutput:
    del rng  # the views are made on the host
    view1, view2 = batch["view1"], batch["view2"]
    apply = functools.partial(sharded_apply, self.model, self.mesh, train=train)
    emb1, z1, model_state = apply(params, model_state, view1)
    _, z2, model_state = apply(params, model_state, view2)
    return ForwardOutput(z1=z1, z2=z2, valid=view1.graph_mask, labels=view1.labels,
                         probe_features=emb1, probe_labels=view1.labels, model_state=model_state)

  # -- data -------------------------------------------------------------------------------------

  def step_graph_indices(self, step: int) -> np.ndarray:
    """Dataset indices of the graphs of global batch ``step`` (fewer than batch_size at an
    epoch's end): a pure function of the step, so resuming needs no iterator state."""
    epoch, position = divmod(int(step), self.steps_per_epoch)
    # GraphCL/ADNCE shuffle the dataset once and then iterate a DataLoader that does not
    # shuffle: every epoch has the same batches (fresh augmentations). Faithful mode keeps that
    # order; proper mode reshuffles each epoch, as a contrastive pipeline normally does.
    order_epoch = 0 if self.config.data.aug_mode == "faithful" else epoch
    order = graphs_lib.epoch_order(len(self.graphs), seed=self.config.seed, epoch=order_epoch)
    batch = self.config.batch_size
    return order[position * batch:(position + 1) * batch]

  def host_batch(self, step: int) -> dict[str, graphs_lib.GraphBatch]:
    """This process's part of global batch ``step``: {"view1", "view2"} of per-device blocks."""
    data = self.config.data
    indices = self.step_graph_indices(step)
    augment_seed = graphs_lib.epoch_augment_seed(self.config.seed,
                                                 int(step) // self.steps_per_epoch)
    firsts, seconds = [], []
    for position in self.local_positions:
      chunk = indices[position * self.per_device:(position + 1) * self.per_device]
      if chunk.size == 0:
        firsts.append(empty_block(self.budget, self.feature_dim))
        seconds.append(empty_block(self.budget, self.feature_dim))
        continue
      first, second = graphs_lib.make_view_batches(
          self.graphs, chunk, seed=augment_seed, aug=data.aug, mode=data.aug_mode,
          budget=self.budget)
      firsts.append(first)
      seconds.append(second)
    return {"view1": concat_blocks(firsts), "view2": concat_blocks(seconds)}

  def train_batches(self, *, start_step: int, num_steps: int) -> Iterator[dict]:
    def produce():
      for step in range(start_step, start_step + num_steps):
        yield self.host_batch(step)
    # Python-side augmentation and packing overlap with the device step (the image pipeline's
    # background-thread prefetcher).
    return pipeline._background(  # pylint: disable=protected-access
        produce, self.config.data.prefetch)

  def to_global(self, local_batch: dict) -> dict:
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.data_sharding, x), local_batch)

  # -- evaluation -------------------------------------------------------------------------------

  def _eval_host_batches(self) -> Iterator[graphs_lib.GraphBatch]:
    """The ORIGINAL graphs (view 1 of the mode) in dataset order, per-device packed; every graph
    appears exactly once (graph_mask marks the real slots)."""
    mode = self.config.data.aug_mode
    per_step = self.eval_per_device * self.mesh.size
    for start in range(0, len(self.graphs), per_step):
      blocks = []
      for position in self.local_positions:
        lo = start + position * self.eval_per_device
        chunk = self.graphs[lo:min(lo + self.eval_per_device, start + per_step)]
        if chunk:
          blocks.append(graphs_lib.pack_graphs([graphs_lib.view_one(g, mode) for g in chunk],
                                               self.eval_budget))
        else:
          blocks.append(empty_block(self.eval_budget, self.feature_dim))
      yield concat_blocks(blocks)

  def embeddings(self, params, model_state) -> tuple[np.ndarray, np.ndarray]:
    """Graph embeddings (N, num_layers * hidden) of every original graph, in dataset order
    (BatchNorm in eval mode), and their labels."""
    # Replicated over this task's mesh, wherever the arrays come from (a checkpoint, one device).
    params, model_state = jax.device_put((params, model_state), self.replicated)

    def dispatched():
      for host in self._eval_host_batches():
        batch = self.to_global(host)
        emb, _, _ = jitted_apply(self.eval_model, self.mesh, params, model_state, batch,
                                 train=False)
        yield emb, batch.graph_mask, batch.labels

    out, labels = [], []
    for emb, mask, lab in device_outputs.fetched_in_order(dispatched(), device_outputs.to_host):
      out.append(emb[mask])
      labels.append(lab[mask])
    return np.concatenate(out).astype(np.float32), np.concatenate(labels)

  def _trained_embeddings(self, state, step: int) -> tuple[np.ndarray, np.ndarray]:
    """`embeddings` of the training state at `step`, computed once: the last epoch's monitor and
    the final evaluation score the same state."""
    if self._embedded is None or self._embedded[0] != step:
      self._embedded = (step, *self.embeddings(state.params["model"], state.model_state))
    return self._embedded[1], self._embedded[2]

  def svm_scores(self, embeddings: np.ndarray, labels: np.ndarray, seeds: list[int], *,
                 cache: dict | None = None, step: int = -1, progress: bool = False,
                 what: str = "SVM CV") -> dict[str, Any]:
    """SVM CV accuracy (percent) of ``embeddings`` for each outer-fold shuffle seed; mean and
    std over those shuffles of this one encoder (``svm_accuracy_std``: 0 with one shuffle; the
    paper's +- is over training seeds, which experiments/ aggregates), and the mean over
    shuffles of the std over folds. `progress` shows a bar
    over the folds (minutes per seed on the large TU datasets), labelled `what`."""
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    ev = self.config.eval
    per_seed, fold_std = [], []
    todo = [s for s in seeds if cache is None or (step, s) not in cache]
    with tqdm(total=len(todo) * ev.folds, unit="fold", desc=what, file=sys.stderr,
              disable=not (progress and todo and jax.process_index() == 0),
              dynamic_ncols=True) as bar:
      for seed in seeds:
        if cache is not None and (step, seed) in cache:
          mean, std = cache[(step, seed)]
        else:
          mean, std = svm_cv.svm_cv_accuracy(embeddings, labels, seed=seed, folds=ev.folds,
                                             inner_folds=ev.inner_folds, on_fold=bar.update)
          if cache is not None:
            cache[(step, seed)] = (mean, std)
        per_seed.append(100.0 * mean)
        fold_std.append(100.0 * std)
    mean, std = svm_cv.mean_std_over_seeds(per_seed)
    return {"svm_accuracy": mean, "svm_accuracy_std": std,
            "svm_fold_std": float(np.mean(fold_std)), "svm_accuracy_per_seed": per_seed}

  def cv_seeds(self) -> list[int]:
    """The outer-fold shuffle seeds of the final evaluation: config.seed, config.seed + 1, ..."""
    return [self.config.seed + r for r in range(self.config.eval.svm_seeds)]

  def monitor(self, state) -> dict[str, float]:
    """One SVM CV (shuffle seed = config.seed): the accuracy the reference logs every 10 epochs."""
    step = int(jax.device_get(state.step))
    emb, labels = self._trained_embeddings(state, step)
    scores = self.svm_scores(emb, labels, [self.config.seed], cache=self._trained_scores,
                             step=step)
    return {"svm_accuracy": scores["svm_accuracy"]}

  def final_evaluation(self, state) -> dict[str, Any]:
    """SVM CV accuracy of the trained encoder (and of the untrained one), in percent."""
    results: dict[str, Any] = {
        "dataset": self.dataset.name, "num_graphs": len(self.graphs),
        "aug": self.config.data.aug, "aug_mode": self.config.data.aug_mode,
        "svm_cv_seeds": self.cv_seeds()}
    step = int(jax.device_get(state.step))
    emb, labels = self._trained_embeddings(state, step)
    results.update(self.svm_scores(emb, labels, self.cv_seeds(), cache=self._trained_scores,
                                   step=step,
                                   progress=self.config.progress_bar, what="SVM CV, trained"))
    if self.config.eval.untrained_baseline:
      from cldro_jax import train  # pylint: disable=import-outside-toplevel
      params, model_state = jax.jit(self.init, out_shardings=self.replicated)(
          train.model_init_key(self.config.seed))
      base = self.svm_scores(*self.embeddings(params, model_state), self.cv_seeds(),
                             progress=self.config.progress_bar, what="SVM CV, untrained")
      results.update({f"untrained_{k}": v for k, v in base.items()})
    return results
