"""Representation evaluators: a linear probe and k-NN on frozen encoder features.

Run inside pretraining (as big_vision runs evaluators: each on its own schedule, from round 0
so the gain over random initialisation shows) and on any checkpoint (`ultrajax.evaluate`).

Features: the MAE encoder on the whole, unmasked image (ImageNet-normalised, as in training),
then the mean of the patch tokens after the final norm ('gap') or the cls token ('cls'),
standardised with the statistics of the probe's training images. Both evaluators follow
scikit-learn (LogisticRegression, fitted on device with L-BFGS; KNeighborsClassifier).

The labelled task (config.evals.task) is a classification task of ultrajax.data.tasks with its
own seeded split: the probes fit on its train and val images (nothing is tuned) and are scored
on its test images. Scalars: eval/<evaluator>/accuracy and eval/<evaluator>/auroc (macro
one-vs-rest for more than two classes).
"""

from __future__ import annotations

import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import optax.tree_utils as otu
from absl import logging
from flax import nnx

from ultrajax import configlib
from ultrajax.data import tasks
from ultrajax.eval import downstream, metrics, significance
from ultrajax.models import mae
from ultrajax.train import loop, sharding as sharding_lib

EVALUATORS = ("linear_probe", "knn")
POOLS = ("gap", "cls")
KNN_METRICS = ("cosine", "euclidean")
KNN_WEIGHTS = ("uniform", "distance")
LBFGS_TOL = 1e-6  # the linear probe's gradient-norm stopping threshold
# config.evals.task: the fields of a classification config.data (configs/finetune_cls.py)
# that tasks.load_task reads; the segmentation-only ones are filled in here.
TASK_DEFAULTS = dict(mask_column="mask", seg_target="lesion")


# ----------------------------------------------------------------------------- features
@functools.lru_cache(maxsize=16)
def _feature_fn(graphdef, sharding):
  """Jitted (encoder params, uint8 images [B, S, S, 3]) -> {'cls', 'gap'}: [B, D] float32."""

  def features(params, images):
    encoder = nnx.merge(graphdef, params)
    tokens = encoder.encode(mae.normalize(images.astype(jnp.float32) / 255.0))
    return dict(cls=tokens[:, 0], gap=tokens[:, 1:].mean(axis=1))

  if sharding is None:
    return jax.jit(features)
  return jax.jit(features, in_shardings=(None, sharding), out_shardings=sharding)


def encoder_features(
  graphdef, params, images: np.ndarray, *, pool: str = "gap", batch_size: int = 64, sharding=None
) -> np.ndarray:
  """images: uint8 [N, S, S, 3] -> features [N, D] float32 of the unmasked images.

  graphdef, params: a ViT encoder (`nnx.split(mae.encoder, nnx.Param)`, params as a pure
  dict). Batches are padded to batch_size (downstream.padded_batches) so one compilation serves
  every call. sharding: a replicated NamedSharding when params live on a mesh (several
  processes); None otherwise.
  """
  if pool not in POOLS:
    raise ValueError(f"pool={pool!r} is not one of {POOLS}")
  fn = _feature_fn(graphdef, sharding)

  def batch(rows):
    x = images[rows]
    return fn(params, x if sharding is None else loop.put_global(x, sharding))[pool]

  return downstream.padded_batches(batch, len(images), batch_size).astype(np.float32)


def standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[N, D], [M, D] -> both scaled by the train mean and population std, constant columns left
  unscaled (StandardScaler)."""
  mean = train.mean(axis=0, dtype=np.float64)
  std = train.std(axis=0, dtype=np.float64)
  std[std < 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0)] = 1.0
  return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


# ----------------------------------------------------------------------------- linear probe
def _logits(params, x):
  """[N, D] -> [N, K]; the binary model's single logit z becomes (0, z)."""
  z = x @ params["w"] + params["b"]
  return jnp.concatenate([jnp.zeros_like(z), z], axis=1) if z.shape[1] == 1 else z


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iters"))
def _fit_logistic(x, y, C, tol, *, num_classes: int, max_iters: int):
  """L-BFGS on mean cross-entropy + |W|^2 / (2 C N): sklearn's objective divided by C N."""
  n, d = x.shape
  width = 1 if num_classes == 2 else num_classes
  params = dict(w=jnp.zeros((d, width), jnp.float32), b=jnp.zeros((width,), jnp.float32))

  def objective(p):
    log_p = jax.nn.log_softmax(_logits(p, x))
    nll = -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1))
    return nll + jnp.sum(p["w"] ** 2) / (2.0 * C * n)

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = solver.update(grad, state, p, value=value, grad=grad, value_fn=objective)
    return optax.apply_updates(p, updates), state

  def running(carry):
    _, state = carry
    count = otu.tree_get(state, "count")
    return (count == 0) | (
      (count < max_iters) & (otu.tree_norm(otu.tree_get(state, "grad")) >= tol)
    )

  params, state = jax.lax.while_loop(running, step, (params, solver.init(params)))
  return params, otu.tree_get(state, "count")


def fit_logistic(
  x: np.ndarray, y: np.ndarray, num_classes: int, *, C: float = 1.0, max_iters: int = 1000
) -> dict:
  """Multinomial logistic regression. x: [N, D] float; y: [N] int in [0, K).

  Minimises C * sum_i CE_i + |W|^2 / 2 (scikit-learn's LogisticRegression(C=C)); returns
  {'w': [D, K'], 'b': [K']} with K' = 1 for two classes, else K. Stops when the gradient norm
  of the objective / (C N) falls below LBFGS_TOL or after max_iters L-BFGS steps.
  """
  if num_classes < 2:
    raise ValueError(f"num_classes={num_classes} must be at least 2")
  params, steps = _fit_logistic(
    jnp.asarray(x, jnp.float32),
    jnp.asarray(y, jnp.int32),
    jnp.float32(C),
    jnp.float32(LBFGS_TOL),
    num_classes=num_classes,
    max_iters=max_iters,
  )
  if int(steps) >= max_iters:
    logging.warning(
      "linear probe: L-BFGS stopped at max_iters=%d before the gradient norm reached %g",
      max_iters,
      LBFGS_TOL,
    )
  return jax.device_get(params)


def logistic_proba(params: dict, x: np.ndarray) -> np.ndarray:
  """[N, D] -> class probabilities [N, K]."""
  return np.asarray(jax.nn.softmax(_logits(params, jnp.asarray(x, jnp.float32))))


# ----------------------------------------------------------------------------- k-NN
@functools.partial(jax.jit, static_argnames=("num_classes", "k", "metric", "weights"))
def _knn_proba(train_x, train_y, test_x, *, num_classes, k, metric, weights):
  if metric == "cosine":
    unit = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    dist = jnp.clip(1.0 - unit(test_x) @ unit(train_x).T, 0.0, 2.0)
  else:
    sq = (
      jnp.sum(test_x**2, axis=1)[:, None]
      + jnp.sum(train_x**2, axis=1)[None]
      - 2.0 * test_x @ train_x.T
    )
    dist = jnp.sqrt(jnp.maximum(sq, 0.0))
  neg, idx = jax.lax.top_k(-dist, k)
  dist = -neg
  if weights == "uniform":
    w = jnp.ones_like(dist)
  else:
    # sklearn: a neighbour at distance 0 takes all the weight (shared among such neighbours).
    exact = dist == 0
    w = jnp.where(
      exact.any(axis=1, keepdims=True), exact.astype(dist.dtype), 1.0 / jnp.where(exact, 1.0, dist)
    )
  votes = jax.nn.one_hot(train_y[idx], num_classes) * w[..., None]
  return votes.sum(axis=1) / w.sum(axis=1, keepdims=True)


def knn_proba(
  train_x: np.ndarray,
  train_y: np.ndarray,
  test_x: np.ndarray,
  num_classes: int,
  *,
  k: int = 20,
  metric: str = "cosine",
  weights: str = "uniform",
) -> np.ndarray:
  """Class probabilities [M, K] of the test points from their k nearest training points.

  train_x [N, D], train_y [N] int, test_x [M, D]; as KNeighborsClassifier(n_neighbors=k,
  metric=metric, weights=weights).predict_proba (its predictions: the argmax, lowest class on
  ties). k is capped at N.
  """
  for name, value, choices in (("metric", metric, KNN_METRICS), ("weights", weights, KNN_WEIGHTS)):
    if value not in choices:
      raise ValueError(f"{name}={value!r} is not one of {choices}")
  return np.asarray(
    _knn_proba(
      jnp.asarray(train_x, jnp.float32),
      jnp.asarray(train_y, jnp.int32),
      jnp.asarray(test_x, jnp.float32),
      num_classes=num_classes,
      k=min(int(k), len(train_x)),
      metric=metric,
      weights=weights,
    )
  )


# ----------------------------------------------------------------------------- evaluators
def scores(labels: np.ndarray, proba: np.ndarray) -> dict:
  """{'accuracy', 'auroc'} of probabilities [M, K] (AUROC: binary, or macro one-vs-rest)."""
  return dict(
    accuracy=metrics.accuracy(labels, proba.argmax(axis=1)), auroc=metrics.auroc(labels, proba)
  )


def linear_probe(
  train_x, train_y, test_x, test_y, num_classes: int, *, C: float = 1.0, max_iters: int = 1000
) -> dict:
  """Standardise, fit logistic regression on train, score on test: {'accuracy', 'auroc'}."""
  return scores(
    test_y,
    probe_proba("linear_probe", train_x, train_y, test_x, num_classes, C=C, max_iters=max_iters),
  )


def knn(train_x, train_y, test_x, test_y, num_classes: int, **options) -> dict:
  """Standardise, k-NN vote of the training features: {'accuracy', 'auroc'}. options: k,
  metric, weights as knn_proba's."""
  return scores(test_y, probe_proba("knn", train_x, train_y, test_x, num_classes, **options))


def probe_proba(name: str, train_x, train_y, test_x, num_classes: int, **options) -> np.ndarray:
  """Test-class probabilities [M, K] of evaluator `name` on standardised features; options:
  C, max_iters (linear_probe) or k, metric, weights (knn)."""
  train_x, test_x = standardize(train_x, test_x)
  if name == "linear_probe":
    params = fit_logistic(train_x, train_y, num_classes, **options)
    return logistic_proba(params, test_x)
  return knn_proba(train_x, train_y, test_x, num_classes, **options)


def validate(config) -> None:
  """Checks config.evals; errors name the field."""
  c = configlib
  c.check_choice(config, "evals.features", POOLS)
  c.check_range(config, "evals.batch_size", 1)
  c.check_choice(config, "evals.task.source", tasks.SOURCES)
  c.check_range(config, "evals.linear_probe.every_rounds", 0)
  c.check_range(config, "evals.linear_probe.C", 0.0, low_inclusive=False)
  c.check_range(config, "evals.linear_probe.max_iters", 1)
  c.check_range(config, "evals.knn.every_rounds", 0)
  c.check_range(config, "evals.knn.k", 1)
  c.check_choice(config, "evals.knn.metric", KNN_METRICS)
  c.check_choice(config, "evals.knn.weights", KNN_WEIGHTS)
  unknown = sorted(set(config.evals) - {"features", "batch_size", "task", *EVALUATORS})
  c.check(not unknown, f"config.evals has unknown entries {unknown}; evaluators are {EVALUATORS}")


def for_pretraining(config, mesh=None, outputs_dir=None) -> Evaluators | None:
  """The pretraining job's evaluators (None when every every_rounds is 0); a mesh makes the
  images replicated global arrays, as params sharded across processes need. outputs_dir: where
  `at_round` keeps each round's test outputs (`outputs_path`), for `summary`'s test."""
  validate(config)
  if not any(config.evals[n].every_rounds > 0 for n in EVALUATORS):
    return None
  sharding = None if mesh is None else sharding_lib.replicated(mesh)
  return Evaluators(config, sharding=sharding, outputs_dir=outputs_dir)


def outputs_path(outputs_dir, round_index: int) -> pathlib.Path:
  """A round's test outputs: labels [M] and each evaluator's probabilities [M, K] (.npz)."""
  return pathlib.Path(outputs_dir) / f"round_{round_index:05d}_test_outputs.npz"


class Evaluators:
  """The evaluators of config.evals on its labelled task, for one model shape.

  `due(round)` says which run at a round; `__call__(params, names)` returns their scalars
  {'eval/<name>/<metric>': float}. The task is loaded (and split) once, at construction.
  """

  def __init__(self, config, *, sharding=None, outputs_dir=None):
    validate(config)
    self.config, self.sharding, self.outputs_dir = config, sharding, outputs_dir
    e = config.evals
    data = ml_collections.ConfigDict({**TASK_DEFAULTS, **e.task.to_dict()})
    try:
      self.task = tasks.load_task(data, "cls", config.model.image_size)
    except configlib.ConfigError as err:  # tasks names config.data's fields
      raise configlib.ConfigError(str(err).replace("config.data.", "config.evals.task.")) from None
    fit = np.concatenate([self.task.indices("train"), self.task.indices("val")])
    test = self.task.indices("test")
    self.train_images, self.train_y = self.task.images[fit], self.task.targets[fit]
    self.test_images, self.test_y = self.task.images[test], self.task.targets[test]
    abstract = nnx.eval_shape(lambda: mae.mae_from_config(config.model, nnx.Rngs(0)))
    self.graphdef = nnx.split(abstract.encoder, nnx.Param)[0]
    logging.info(
      "Evaluators %s on %s (%s features): fit on %d, scored on %d images.",
      ", ".join(f"{n} every {e[n].every_rounds} rounds" for n in self.enabled()),
      e.task.source,
      e.features,
      len(fit),
      len(test),
    )

  def enabled(self) -> list[str]:
    return [n for n in EVALUATORS if self.config.evals[n].every_rounds > 0]

  def due(self, round_index: int) -> list[str]:
    """Evaluators to run after `round_index` rounds: at 0, every every_rounds, and the last."""
    last = self.config.fed.num_rounds
    return [
      n
      for n in self.enabled()
      if round_index in (0, last) or round_index % self.config.evals[n].every_rounds == 0
    ]

  def at_round(self, params, round_index: int) -> dict:
    """Scalars of the evaluators due after `round_index` rounds ({} when none is); with an
    outputs_dir, process 0 also writes their test outputs there (atomically)."""
    names = self.due(round_index)
    out, probas = self.run(params, names)
    if names and self.outputs_dir is not None and jax.process_index() == 0:
      loop.atomic_write(
        outputs_path(self.outputs_dir, round_index), dict(labels=self.test_y, **probas)
      )
    return out

  def features(self, params) -> tuple[np.ndarray, np.ndarray]:
    """MAE params (pure dict) -> (fit features [N, D], test features [M, D])."""
    e = self.config.evals
    options = dict(pool=e.features, batch_size=e.batch_size, sharding=self.sharding)
    get = functools.partial(encoder_features, self.graphdef, params["encoder"], **options)
    return get(self.train_images), get(self.test_images)

  def __call__(self, params, names=EVALUATORS) -> dict:
    """{'eval/<name>/<metric>': float} of the evaluators `names`."""
    return self.run(params, names)[0]

  def run(self, params, names) -> tuple[dict, dict]:
    """(scalars as __call__'s, {name: test probabilities [M, K]})."""
    if not names:
      return {}, {}
    t0 = time.perf_counter()
    e = self.config.evals
    train_x, test_x = self.features(params)
    options = dict(
      linear_probe=dict(C=e.linear_probe.C, max_iters=e.linear_probe.max_iters),
      knn=dict(k=e.knn.k, metric=e.knn.metric, weights=e.knn.weights),
    )
    out, probas = {}, {}
    for name in names:
      probas[name] = probe_proba(
        name, train_x, self.train_y, test_x, self.task.num_classes, **options[name]
      )
      out.update(
        {f"eval/{name}/{m}": float(v) for m, v in scores(self.test_y, probas[name]).items()}
      )
    logging.info(
      "Evaluators (%.1f s): %s",
      time.perf_counter() - t0,
      "  ".join(f"{key[5:]} {v:.4f}" for key, v in out.items()),
    )
    return out, probas


def summary(rows: list[dict], outputs_dir=None, num_samples: int = 1000) -> str:
  """'eval/<name>/<metric>: first -> last (rounds a -> b)' per key of metrics.jsonl rows. Where
  outputs_dir holds both rounds' test outputs (`at_round`), the change gets its 95% interval
  and two-sided p-value from a paired bootstrap over the test images (significance.
  paired_bootstrap, seed 0): is the last round's encoder better than the first's on this task,
  beyond what the test sample's size allows?"""

  @functools.cache
  def changes(name: str, r1: int, r0: int) -> tuple[dict, int]:
    """({metric: Comparison} of round r1 against r0, number of test images) from their kept
    outputs, both metrics on one bootstrap; ({}, 0) where either round's outputs are missing."""
    paths = [outputs_path(outputs_dir, r) for r in (r1, r0)] if outputs_dir else []
    if r1 == r0 or not paths or not all(path.exists() for path in paths):
      return {}, 0
    last, first = (dict(np.load(path)) for path in paths)
    if name not in last or name not in first:  # a round that did not run this evaluator
      return {}, 0
    test = significance.paired_bootstrap(
      scores, last["labels"], last[name], first[name], num_samples=num_samples
    )
    return test, len(last["labels"])

  lines = []
  keys = sorted({k for row in rows for k in row if k.startswith("eval/")})
  for key in keys:
    seen = [(row["round"], row[key]) for row in rows if key in row and "round" in row]
    (r0, v0), (r1, v1) = seen[0], seen[-1]
    line = f"{key}: {v0:.4f} at round {r0:.0f} -> {v1:.4f} at round {r1:.0f} ({v1 - v0:+.4f}"
    _, name, metric = key.split("/")
    found, num_test = changes(name, int(r1), int(r0))
    if metric in found:
      c = found[metric]
      line += (
        f" [{c.ci_low:+.4f}, {c.ci_high:+.4f}], p {c.pvalue:.3g}: paired bootstrap over"
        f" {num_test} test images"
      )
    lines.append(line + ")")
  return "\n".join(lines)
