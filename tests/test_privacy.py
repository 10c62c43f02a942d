"""Privacy and robustness (issue 20): DP-FedAvg, accountant, secure aggregation, robust rules,
the gradient-inversion audit. References: dp-accounting, numpy, scipy, TF Privacy's README."""
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ultrajax import configlib
from ultrajax.fed import privacy, robust, secagg


def _stack(num=5, seed=0):
  rng = np.random.default_rng(seed)
  return {"a": jnp.asarray(rng.normal(size=(num, 3, 4)), jnp.float32),
          "b": {"c": jnp.asarray(rng.normal(size=(num, 7)), jnp.float32)}}


def _np_flat(tree):
  return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)], 1)


# --- DP-FedAvg -------------------------------------------------------------------------------

def test_clipping_matches_numpy():
  tree = _stack()
  flat = _np_flat(tree)
  norms = np.linalg.norm(flat, axis=1)
  clip = float(np.median(norms))
  clipped, got_norms = privacy.clip_updates(tree, clip)
  want = flat * np.minimum(1.0, clip / norms)[:, None]
  np.testing.assert_allclose(got_norms, norms, rtol=1e-5)
  np.testing.assert_allclose(_np_flat(clipped), want, rtol=1e-5, atol=1e-6)
  assert np.all(np.linalg.norm(_np_flat(clipped), axis=1) <= clip * (1 + 1e-5))


def test_dp_mean_is_clipped_sum_over_m_plus_noise_of_std_zc_over_m():
  num, dim = 4, 20000
  tree = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(num, dim)), jnp.float32)}
  part = np.array([True, True, False, True])
  clip, z, m = 50.0, 1.3, 2.5
  out = np.asarray(privacy.dp_mean(tree, part, clip, z, m, jax.random.key(0))["w"])
  flat = np.asarray(tree["w"], np.float64)
  scaled = flat * np.minimum(1.0, clip / np.linalg.norm(flat, axis=1))[:, None]
  mean = scaled[part].sum(0) / m
  resid = out - mean
  assert privacy.noise_std(z, clip, m) == pytest.approx(z * clip / m)
  assert resid.std() == pytest.approx(z * clip / m, rel=0.03)  # 20000 draws: ~0.5% sd
  assert abs(resid.mean()) < 4 * z * clip / m / math.sqrt(dim)


def test_adaptive_clipping_moves_toward_the_target_quantile():
  norms = jnp.asarray(np.random.default_rng(2).normal(1.0, 0.1, 50), jnp.float32)
  part = np.ones(50, bool)
  key = jax.random.key(0)
  # C far below every norm: nobody is unclipped (b=0 < gamma) -> C grows.
  up, b = privacy.adaptive_clip(0.1, norms, part, 0.5, 0.2, 0.0, key)
  assert float(b) == 0.0 and float(up) == pytest.approx(0.1 * math.exp(0.2 * 0.5), rel=1e-6)
  # C far above: all unclipped (b=1 > gamma) -> C shrinks.
  down, b = privacy.adaptive_clip(10.0, norms, part, 0.5, 0.2, 0.0, key)
  assert float(b) == 1.0 and float(down) < 10.0
  c = 0.1  # the anchors' toy: converges near the median norm (Flower's sign runs off to 0)
  for t in range(80):
    c, _ = privacy.adaptive_clip(c, norms, part, 0.5, 0.2, 50 / 20, jax.random.key(t))
  assert 0.85 < float(c) < 1.15
  assert privacy.adaptive_noise_multiplier(1.0, 2.5) == pytest.approx((1 - 0.04) ** -0.5)
  with pytest.raises(configlib.ConfigError, match="sigma_b"):
    privacy.adaptive_noise_multiplier(1.0, 0.4)


def test_sampling_is_seeded_by_seed_and_round():
  a = privacy.poisson_sample(1000, 0.3, seed=1, round_num=5)
  np.testing.assert_array_equal(a, privacy.poisson_sample(1000, 0.3, seed=1, round_num=5))
  assert not np.array_equal(a, privacy.poisson_sample(1000, 0.3, seed=1, round_num=6))
  assert abs(a.mean() - 0.3) < 0.06
  f = privacy.fixed_size_sample(16, 5, seed=1, round_num=0)
  assert f.sum() == 5
  with pytest.raises(configlib.ConfigError, match="cohort size"):
    privacy.fixed_size_sample(4, 5, 0, 0)


# --- accountant ------------------------------------------------------------------------------

def test_epsilon_equals_dp_accounting_directly():
  acct = privacy.Accountant(noise_multiplier=1.1, delta=1e-5, sampling_rate=0.05)
  direct = dp_accounting.rdp.RdpAccountant()
  direct.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)),
                 200)
  assert acct.epsilon(200) == pytest.approx(direct.get_epsilon(1e-5), abs=1e-6)
  pld = privacy.Accountant(noise_multiplier=1.1, delta=1e-5, sampling_rate=0.05, kind="pld",
                           pld_discretization=1e-3)
  d = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
  d.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), 20)
  assert pld.epsilon(20) == pytest.approx(d.get_epsilon(1e-5), abs=1e-6)
  fixed = privacy.Accountant(noise_multiplier=1.0, delta=1e-5, sampling="fixed",
                             population=16, sample_size=4)
  r = dp_accounting.rdp.RdpAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  r.compose(dp_accounting.SampledWithoutReplacementDpEvent(
      16, 4, dp_accounting.GaussianDpEvent(1.0)), 10)
  assert fixed.epsilon(10) == pytest.approx(r.get_epsilon(1e-5), abs=1e-6)
  with pytest.raises(configlib.ConfigError, match="kind='rdp'"):
    privacy.Accountant(noise_multiplier=1.0, delta=1e-5, sampling="fixed", population=16,
                       sample_size=4, kind="pld")


def test_dp_sgd_accounting_matches_the_published_mnist_example():
  # TF Privacy tutorials/README.md: N=60000, batch 256, noise 1.12, 60 epochs -> eps 2.92 at
  # delta 1e-5 (RDP with the classic conversion eps = min_a RDP(a) + log(1/delta) / (a - 1)).
  acct = privacy.dp_sgd_accountant(256, 60000, 1.12, 1e-5)
  steps = 60 * 60000 // 256
  rdp = dp_accounting.rdp.RdpAccountant([1 + x / 10 for x in range(1, 100)] +
                                        list(range(12, 64)))
  rdp.compose(acct.event(), steps)
  classic = min(r + math.log(1 / 1e-5) / (a - 1) for a, r in zip(rdp.orders, rdp.rdp))
  assert classic == pytest.approx(2.92, rel=0.01)
  assert acct.epsilon(steps) <= classic  # dp-accounting's conversion is tighter


def test_budget_stop_and_checkpoint_state():
  # cross-silo: every hospital every round (no subsampling), budget 5 -> 5 rounds at z = 2
  acct = privacy.Accountant(noise_multiplier=2.0, delta=1e-5, epsilon_budget=5.0)
  eps = [acct.epsilon(t) for t in range(1, 9)]
  assert np.all(np.diff(eps) > 0)
  last_ok = max(t for t, e in enumerate(eps, 1) if e <= 5.0)
  assert 1 < last_ok < 8
  assert not acct.would_exceed(last_ok - 1) and acct.would_exceed(last_ok)
  state = acct.state(last_ok)
  assert acct.check_state(state) == last_ok
  other = privacy.Accountant(noise_multiplier=1.5, delta=1e-5)
  with pytest.raises(configlib.ConfigError, match="noise_multiplier"):
    other.check_state(state)


def test_dp_sgd_grad_clips_each_example():
  w = {"w": jnp.ones(3)}
  x = jnp.asarray([[1.0, 0, 0], [0, 100.0, 0]])

  def loss(params, batch):  # gradient of example i is x_i
    return jnp.sum(batch @ params["w"]) / batch.shape[0]
  g = privacy.dp_sgd_grad(loss, w, x, jax.random.key(0), 1.0, 0.0)
  np.testing.assert_allclose(g["w"], [0.5, 0.5, 0.0], atol=1e-6)
  noisy = privacy.dp_sgd_grad(loss, {"w": jnp.ones(20000)}, jnp.zeros((4, 20000)),
                              jax.random.key(1), 2.0, 1.5)
  assert float(noisy["w"].std()) == pytest.approx(1.5 * 2.0 / 4, rel=0.03)


# --- secure aggregation ----------------------------------------------------------------------

@pytest.mark.parametrize("dropped", [(), (1, 3)])
def test_masked_sum_equals_plain_sum(dropped):
  cfg = secagg.SecAggConfig(bits=32, clip_range=8.0, max_clients=5)
  tree = _stack(5, seed=3)
  w = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
  total, wsum = secagg.secure_weighted_sum(tree, w, cfg, seed=0, round_num=2,
                                           dropped_after_masking=dropped)
  keep = np.array([k not in dropped for k in range(5)])
  flat = _np_flat(tree).astype(np.float64)
  # exact in the ring: the masked sum decodes to the sum of the same quantised values
  enc = [secagg.encode(np.concatenate([[w[k]], w[k] * flat[k]]), cfg) for k in range(5)]
  want = secagg.decode(np.mod(sum(e for e, k in zip(enc, keep) if k), cfg.modulus), cfg)
  got = np.asarray(jax.flatten_util.ravel_pytree(total)[0])
  assert wsum == want[0]
  np.testing.assert_array_equal(got, want[1:].astype(np.float32))
  np.testing.assert_allclose(got, (w[keep, None] * flat[keep]).sum(0),
                             atol=5 * 0.5 / cfg.scale + 1e-6)


def test_single_masked_upload_is_uniform():
  cfg = secagg.SecAggConfig(bits=16, clip_range=1.0, max_clients=4)
  enc = secagg.encode(np.zeros(20000), cfg)  # the most structured message: all zeros
  secrets = secagg.client_secrets(4, seed=0)
  y = secagg.mask(enc, 0, range(4), secrets, round_salt=7, cfg=cfg)
  counts = np.bincount((y * 16 // cfg.modulus).astype(int), minlength=16)
  assert stats.chisquare(counts).pvalue > 1e-3
  assert stats.kstest(y / cfg.modulus, "uniform").pvalue > 1e-3
  assert secagg.pair_seed(1, 2, secrets, 7) == secagg.pair_seed(2, 1, secrets, 7)
  assert secagg.pair_seed(1, 2, secrets, 7) != secagg.pair_seed(1, 2, secrets, 8)


# --- robust aggregation ----------------------------------------------------------------------

def test_median_trimmed_mean_and_krum_match_numpy():
  tree = _stack(7, seed=4)
  flat = _np_flat(tree)
  med = _np_flat(jax.tree.map(lambda x: x[None], robust.coordinate_median(tree)))[0]
  np.testing.assert_allclose(med, np.median(flat, axis=0), rtol=1e-6)
  tm = _np_flat(jax.tree.map(lambda x: x[None], robust.trimmed_mean(tree, 0.2)))[0]
  np.testing.assert_allclose(tm, stats.trim_mean(flat, 0.2, axis=0), rtol=1e-5, atol=1e-6)
  f, m = 2, 3
  dist = ((flat[:, None] - flat[None]) ** 2).sum(-1)
  scores = np.array([np.sort(np.delete(dist[i], i))[:7 - f - 2].sum() for i in range(7)])
  np.testing.assert_allclose(robust.krum_scores(tree, f), scores, rtol=1e-4)
  agg, sel = robust.krum(tree, f, m)
  np.testing.assert_array_equal(sel, np.argsort(scores)[:m])
  got = _np_flat(jax.tree.map(lambda x: x[None], agg))[0]
  np.testing.assert_allclose(got, flat[np.argsort(scores)[:m]].mean(0), rtol=1e-5, atol=1e-6)
  with pytest.raises(configlib.ConfigError, match="C > 2f"):
    robust.krum_scores(tree, 3)


def test_screen_excludes_nan_and_scaled_clients_and_renormalises():
  tree = _stack(5, seed=5)
  tree = jax.tree.map(lambda x: x.at[1].set(jnp.nan).at[3].multiply(1e6), tree)
  keep, w, report = robust.screen(tree, np.full(5, 0.2), norm_factor=100.0)
  assert report["nonfinite"] == [1] and report["too_large"] == [3]
  np.testing.assert_array_equal(keep, [True, False, True, False, True])
  np.testing.assert_allclose(w, [1 / 3, 0, 1 / 3, 0, 1 / 3], rtol=1e-6)
  bounded = robust.norm_bounded_mean(jax.tree.map(lambda x: x[np.array([0, 3])], tree),
                                     [0.5, 0.5], 1.0)
  assert float(privacy.global_norm(bounded)) <= 1.0 + 1e-5


# --- audit -----------------------------------------------------------------------------------

def test_audit_gate_attack_succeeds_without_dp_and_fails_with_it():
  from ultrajax import audit
  res = audit.run_audit(image_size=16, iters=AUDIT_ITERS, scenarios=("plain", "dp"))
  assert res["plain"]["psnr"] > AUDIT_PSNR_THRESHOLD, res
  assert res["dp"]["psnr"] < AUDIT_PSNR_THRESHOLD, res


# Measured at these settings (16 px, patch 8, width 32, 1 image, 200 Adam steps, seed 0):
# plain 15.2 dB PSNR / SSIM 0.56, DP (z=1, C=1) 9.3 dB / 0.04; a random image scores ~8 dB.
# The threshold sits between them (docs/privacy.md).
AUDIT_ITERS = 200
AUDIT_PSNR_THRESHOLD = 12.5
