"""Linear probe and k-NN evaluators against scikit-learn on the same features."""

import pathlib

import jax
import numpy as np
import pytest
from flax import nnx
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ultrajax import configlib
from ultrajax.eval import evaluators
from ultrajax.models import mae, vit

REPO = pathlib.Path(__file__).resolve().parents[1]


def blobs(num_classes, spread, n=160, d=12, seed=0, constant_column=False):
  """Gaussian classes around random centres; `spread` sets how much they overlap."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, d)) * 2.0
  y = rng.integers(0, num_classes, n)
  x = centres[y] + spread * rng.normal(size=(n, d)) + 5.0  # an offset for the scaler to remove
  if constant_column:
    x[:, 0] = 3.0
  x = x.astype(np.float32)
  return x[: n // 2], y[: n // 2], x[n // 2 :], y[n // 2 :]


@pytest.mark.parametrize(
  "num_classes, spread, C",
  [
    (2, 0.3, 1.0),  # separable: the penalty alone bounds the weights
    (2, 3.0, 0.5),  # noisy binary
    (3, 2.5, 1.0),  # noisy multinomial
  ],
)
def test_linear_probe_matches_sklearn_logistic_regression(num_classes, spread, C):
  train_x, train_y, test_x, test_y = blobs(num_classes, spread, constant_column=True)
  ref = make_pipeline(StandardScaler(), LogisticRegression(C=C, tol=1e-10, max_iter=10000))
  ref.fit(train_x, train_y)
  ref_proba = ref.predict_proba(test_x)

  tr, te = evaluators.standardize(train_x, test_x)
  params = evaluators.fit_logistic(tr, train_y, num_classes, C=C)
  proba = evaluators.logistic_proba(params, te)
  lr = ref[-1]
  coef = lr.coef_.T
  np.testing.assert_allclose(params["w"], coef, atol=2e-3 * max(1.0, np.abs(coef).max()))
  np.testing.assert_allclose(proba, ref_proba, atol=2e-3)
  assert np.mean(proba.argmax(1) == ref.predict(test_x)) >= 0.98

  got = evaluators.linear_probe(train_x, train_y, test_x, test_y, num_classes, C=C)
  want_auroc = roc_auc_score(
    test_y, ref_proba[:, 1] if num_classes == 2 else ref_proba, multi_class="ovr"
  )
  assert abs(got["auroc"] - want_auroc) < 0.01
  assert abs(got["accuracy"] - ref.score(test_x, test_y)) < 0.01


@pytest.mark.parametrize(
  "num_classes, metric, weights, k",
  [
    (2, "cosine", "uniform", 7),
    (3, "euclidean", "distance", 5),
    (3, "cosine", "distance", 200),  # k above the training size: every point votes
  ],
)
def test_knn_matches_sklearn_kneighbors(num_classes, metric, weights, k):
  train_x, train_y, test_x, test_y = blobs(num_classes, 2.0, seed=1)
  test_x[0] = train_x[3]  # a test point on a training point: distance 0
  tr, te = evaluators.standardize(train_x, test_x)
  ref = KNeighborsClassifier(
    n_neighbors=min(k, len(tr)), metric=metric, weights=weights, algorithm="brute"
  ).fit(tr, train_y)
  proba = evaluators.knn_proba(tr, train_y, te, num_classes, k=k, metric=metric, weights=weights)
  np.testing.assert_allclose(proba, ref.predict_proba(te), atol=1e-5)
  np.testing.assert_array_equal(proba.argmax(1), ref.predict(te))

  got = evaluators.knn(
    train_x, train_y, test_x, test_y, num_classes, k=k, metric=metric, weights=weights
  )
  ref_proba = ref.predict_proba(te)
  assert got["accuracy"] == pytest.approx(ref.score(te, test_y))
  want = roc_auc_score(
    test_y, ref_proba[:, 1] if num_classes == 2 else ref_proba, multi_class="ovr"
  )
  # Uniform votes are exact fractions, so the AUROC equals sklearn's; 1/distance weights in
  # float32 (sklearn: float64) can swap the order of nearly equal scores, and how many swap
  # depends on XLA's compile options. There the probabilities are checked above (1e-5) and the
  # AUROC against scikit-learn's on the same probabilities.
  if weights != "uniform":
    want = roc_auc_score(test_y, proba[:, 1] if num_classes == 2 else proba, multi_class="ovr")
  assert got["auroc"] == pytest.approx(want, abs=1e-9)


def test_standardize_matches_standard_scaler():
  train_x, _, test_x, _ = blobs(2, 1.0, constant_column=True)
  scaler = StandardScaler().fit(train_x)
  tr, te = evaluators.standardize(train_x, test_x)
  np.testing.assert_allclose(tr, scaler.transform(train_x), atol=1e-5)
  np.testing.assert_allclose(te, scaler.transform(test_x), atol=1e-5)


def test_encoder_features_are_pooled_tokens_of_the_whole_image():
  # Random parameters on an abstract model: no eager init, one compilation for the reference.
  abstract = nnx.eval_shape(
    lambda: vit.ViT(
      width=32, depth=1, num_heads=2, patch_size=8, image_size=16, pool="none", rngs=nnx.Rngs(0)
    )
  )
  graphdef, state = nnx.split(abstract, nnx.Param)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda s: (0.2 * rng.normal(size=s.shape)).astype(np.float32), nnx.to_pure_dict(state)
  )
  images = rng.integers(0, 256, (5, 16, 16, 3), np.uint8)
  tokens = np.asarray(
    jax.jit(lambda p, x: nnx.merge(graphdef, p).encode(mae.normalize(x / 255.0)))(params, images)
  )
  # 5 images in batches of 2: the last batch is padded and trimmed.
  gap = evaluators.encoder_features(graphdef, params, images, pool="gap", batch_size=2)
  cls = evaluators.encoder_features(graphdef, params, images, pool="cls", batch_size=2)
  np.testing.assert_allclose(gap, tokens[:, 1:].mean(1), atol=1e-5)
  np.testing.assert_allclose(cls, tokens[:, 0], atol=1e-5)


@pytest.mark.parametrize(
  "field, value",
  [
    ("evals.knn.metric", "manhattan"),
    ("evals.linear_probe.C", 0.0),
    ("evals.features", "max"),
    ("evals.knn.every_rounds", -1),
    ("evals.task.source", "s3"),
  ],
)
def test_bad_evals_config_fails_naming_the_field(field, value):
  config = configlib.load_config_module(REPO / "configs" / "pretrain_fed.py").get_config("smoke")
  config.update_from_flattened_dict({field: value})
  with pytest.raises(configlib.ConfigError, match=field.replace(".", r"\.")):
    evaluators.validate(config)


def test_cli_refuses_a_missing_round_or_two_sources(tmp_path):
  from ultrajax import evaluate

  (tmp_path / "checkpoints" / "3" / "params").mkdir(parents=True)
  assert evaluate.resolve(str(tmp_path), 3) == (tmp_path.absolute() / "checkpoints" / "3", 3)
  with pytest.raises(FileNotFoundError, match="--round=7"):
    evaluate.resolve(str(tmp_path), 7)
  with pytest.raises(ValueError, match="exactly one"):
    evaluate.resolve(str(tmp_path), None, str(tmp_path))


def test_summary_tests_the_change_on_the_kept_outputs(tmp_path):
  """summary's interval and p for round 0 -> N, from the rounds' kept test outputs: equal
  outputs give +0 with p 1; a last round that ranks every case right against a first that
  ranks at random gives an interval above 0 (the bootstrap's p floor, 2 / 201, at 200
  resamples) and its AUROC change is the one worked out with scikit-learn."""
  rng = np.random.default_rng(0)
  labels = np.repeat([0, 1], 40)
  noise = rng.uniform(size=80)
  first = np.stack([1 - noise, noise], 1)
  perfect = np.stack([1.0 - labels, labels.astype(float)], 1) * 0.8 + 0.1
  rows = [{"round": 0, "eval/knn/auroc": 0.0}, {"round": 7, "eval/knn/auroc": 0.0}]
  for r, proba in ((0, first), (7, first)):
    np.savez(evaluators.outputs_path(tmp_path, r), labels=labels, knn=proba)
  assert "(+0.0000 [+0.0000, +0.0000], p 1: paired bootstrap over 80" in evaluators.summary(
    rows, tmp_path, num_samples=200
  )
  np.savez(evaluators.outputs_path(tmp_path, 7), labels=labels, knn=perfect)
  text = evaluators.summary(rows, tmp_path, num_samples=200)
  low = float(text.split("[")[1].split(",")[0])
  assert low > 0 and "p 0.00995" in text
  gain = 1.0 - roc_auc_score(labels, noise)
  assert evaluators.significance.paired_bootstrap(
    evaluators.scores, labels, perfect, first, num_samples=10
  )["auroc"].diff == pytest.approx(gain)
  # Without kept outputs (or at one round only) the line is as before, untested.
  assert "bootstrap" not in evaluators.summary(rows, tmp_path / "none")
