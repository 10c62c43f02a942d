r"""Privacy audit: a gradient-inversion attack on one client's MAE update.

  python -m ultrajax.audit --out=/tmp/audit [--iters=400 --noise_multiplier=1.0 ...]

Inverting Gradients (Geiping et al. 2020): the attacker holds the global model and the update
a client sent, and optimises dummy images x' so that the update they would produce points the
same way: minimise 1 - cos(g(x'), g_obs) + tv * TV(x') with Adam on the signed gradient, x'
kept in the [0, 1] box. MAE's loss needs no labels, so nothing else has to be guessed.

Assumptions (each favours the attacker, as an audit should):
  * the client takes one local SGD step on its batch, so the update is -lr x the gradient
    (the cosine ignores lr); several local steps leak less, not nothing;
  * the attacker knows the mask (a fixed key; a server that chooses the masking seed does);
  * norm_pix=False by default: with norm_pix each masked patch's mean and contrast never
    reach the loss, which hides them from this attack (use --norm_pix to audit that setting).

Scenarios: 'plain' (the update itself), 'dp' (the update clipped to clip_norm plus the
DP-FedAvg noise N(0, (z C)^2), as seen in the aggregate, up to the 1/m scale the cosine
ignores), 'secagg' (the server only sees the sum of secagg_clients clients' updates; one
dummy image is scored against its best-matching true image). Writes audit.json (PSNR, SSIM of
each reconstruction against the true images, scikit-image, data_range 1) and audit.png.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from skimage import metrics as skm

from ultrajax import configlib
from ultrajax.data import phantom
from ultrajax.fed import privacy
from ultrajax.models import mae as mae_lib
from ultrajax.train import divergence


def tiny_mae(image_size: int, patch_size: int, width: int, seed: int):
  """(graphdef, params) of a 1-block MAE with a 1-block decoder of the same width."""
  model = mae_lib.MAE(
    width=width,
    depth=1,
    num_heads=2,
    patch_size=patch_size,
    image_size=image_size,
    decoder_width=width,
    decoder_depth=1,
    decoder_heads=2,
    rngs=nnx.Rngs(seed),
  )
  return nnx.split(model, nnx.Param)


def fixed_mask(num_images: int, num_patches: int, len_keep: int, seed: int):
  """[B, N] bool, True = masked: a random mask from a fixed key, known to the attacker."""
  noise = jax.random.uniform(jax.random.key(seed + 1), (num_images, num_patches))
  ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  return ranks >= len_keep


def phantom_images(num: int, image_size: int, seed: int) -> np.ndarray:
  """[num, S, S, 3] float32 in [0, 1]: phantom ultrasound images of varied organs."""
  rng = np.random.default_rng(seed)
  organs = rng.choice(phantom.ORGANS, num)
  grey = [phantom.generate(rng, str(o), "linear", image_size)["image"] for o in organs]
  return np.repeat(np.stack(grey)[..., None], 3, axis=-1).astype(np.float32) / 255.0


def make_grad_fn(graphdef, mask, patch_size: int, norm_pix: bool):
  """images01 [B, S, S, 3] -> gradient pytree of MAE's loss w.r.t. the parameters."""

  def loss(params, images01):
    model = nnx.merge(graphdef, params)
    x = mae_lib.normalize(images01)
    return mae_lib.mae_loss(model(x, mask), x, mask, patch_size, norm_pix)[0]

  return lambda params, images01: jax.grad(loss)(params, images01)


def _cosine_distance(a, b):
  dot = sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return 1.0 - dot / (divergence.global_norm(a) * divergence.global_norm(b) + 1e-12)


def _tv(x):
  """Anisotropic total variation, mean absolute neighbour difference. x: [B, S, S, 3]."""
  return jnp.abs(x[:, 1:] - x[:, :-1]).mean() + jnp.abs(x[:, :, 1:] - x[:, :, :-1]).mean()


def make_attack(grad_fn, params, shape, *, iters: int, lr: float, tv: float):
  """Inverting Gradients, jitted once: observed gradient pytree, seed key -> dummy images
  [shape] in [0, 1] whose gradient points like `observed`. Adam on the signed gradient (as
  Geiping et al.) with the step decayed by cosine to 0, the dummy clipped to the box."""

  def objective(x, observed):
    return _cosine_distance(grad_fn(params, x), observed) + tv * _tv(x)

  opt = optax.adam(optax.cosine_decay_schedule(lr, iters))

  def attack(observed, key):
    def step(_, carry):
      x, state = carry
      g = jax.grad(objective)(x, observed)
      updates, state = opt.update(jnp.sign(g), state)
      return jnp.clip(optax.apply_updates(x, updates), 0.0, 1.0), state

    x0 = jax.random.uniform(key, shape, jnp.float32)
    return jax.lax.fori_loop(0, iters, step, (x0, opt.init(x0)))[0]

  return jax.jit(attack)


def score(truth: np.ndarray, recon: np.ndarray) -> dict:
  """Best match of each reconstruction among the true images: PSNR (dB) and SSIM."""
  psnr, ssim = [], []
  for r in recon:
    pairs = [
      (
        skm.peak_signal_noise_ratio(t, r, data_range=1.0),
        skm.structural_similarity(t, r, data_range=1.0, channel_axis=-1),
      )
      for t in truth
    ]
    best = max(pairs)
    psnr.append(float(best[0]))
    ssim.append(float(best[1]))
  return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim))}


def run_audit(
  *,
  image_size: int = 16,
  patch_size: int = 8,
  width: int = 32,
  num_images: int = 1,
  iters: int = 300,
  lr: float = 0.1,
  tv: float = 0.05,
  noise_multiplier: float = 1.0,
  clip_norm: float = 1.0,
  secagg_clients: int = 4,
  norm_pix: bool = False,
  seed: int = 0,
  scenarios=("plain", "dp", "secagg"),
) -> dict:
  """Runs the attack in each scenario; returns {scenario: {psnr, ssim}} plus the images
  (key 'images': {'truth': [B, S, S, 3], scenario: reconstruction})."""
  graphdef, params = tiny_mae(image_size, patch_size, width, seed)
  num_patches = (image_size // patch_size) ** 2
  len_keep = int(num_patches * 0.25)
  mask = fixed_mask(num_images, num_patches, len_keep, seed)
  grad_fn = jax.jit(make_grad_fn(graphdef, mask, patch_size, norm_pix))
  truth = phantom_images(num_images * max(secagg_clients, 1), image_size, seed)
  target = truth[:num_images]
  update = grad_fn(params, jnp.asarray(target))
  attack = make_attack(grad_fn, params, target.shape, iters=iters, lr=lr, tv=tv)
  out, images = {}, {"truth": target}
  for name in scenarios:
    compare = target
    if name == "plain":
      observed = update
    elif name == "dp":
      clipped, _ = privacy.clip_update(update, clip_norm)
      observed = privacy.add_noise(clipped, noise_multiplier * clip_norm, jax.random.key(seed + 3))
    elif name == "secagg":
      compare = truth
      observed = update
      for k in range(1, secagg_clients):
        observed = jax.tree.map(
          jnp.add,
          observed,
          grad_fn(params, jnp.asarray(truth[k * num_images : (k + 1) * num_images])),
        )
    else:
      raise configlib.ConfigError(f"audit scenario {name!r} is not plain, dp or secagg")
    recon = np.asarray(attack(observed, jax.random.key(seed + 7)))
    out[name] = score(compare, recon)
    images[name] = recon
  out["images"] = images
  return out


def save_png(images: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(images)
  cols = images["truth"].shape[0]
  fig, axes = plt.subplots(cols, len(names), figsize=(2.2 * len(names), 2.2 * cols), squeeze=False)
  for j, name in enumerate(names):
    for i in range(cols):
      axes[i, j].imshow(np.clip(images[name][i], 0, 1))
      axes[i, j].set_axis_off()
    axes[0, j].set_title(name)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def define_flags() -> dict:
  """The command's flags, defined only when it runs as a command: `--out` and `--verbose`
  would otherwise clash with ultrajax.export's in a process importing both."""
  return dict(
    out=flags.DEFINE_string("out", None, "Output folder for audit.json and audit.png."),
    image_size=flags.DEFINE_integer("image_size", 16, "Image side in pixels."),
    patch_size=flags.DEFINE_integer("patch_size", 8, "Patch side in pixels."),
    width=flags.DEFINE_integer("width", 32, "Encoder and decoder width."),
    num_images=flags.DEFINE_integer("num_images", 1, "Images in the attacked client's batch."),
    iters=flags.DEFINE_integer("iters", 400, "Adam iterations of the attack."),
    lr=flags.DEFINE_float("lr", 0.1, "Adam learning rate on the dummy images."),
    tv=flags.DEFINE_float("tv", 0.05, "Weight of the total-variation prior."),
    noise_multiplier=flags.DEFINE_float("noise_multiplier", 1.0, "DP noise multiplier z."),
    clip_norm=flags.DEFINE_float("clip_norm", 1.0, "DP clip norm C of the update."),
    secagg_clients=flags.DEFINE_integer(
      "secagg_clients", 4, "Clients in the securely aggregated sum."
    ),
    norm_pix=flags.DEFINE_bool("norm_pix", False, "Per-patch normalised targets (MAE's)."),
    seed=flags.DEFINE_integer("seed", 0, "Seed of the model, images, mask and attack."),
    verbose=flags.DEFINE_bool("verbose", False, "Show the traceback of user errors too."),
  )


def main(argv, f):
  del argv
  v = {name: flag.value for name, flag in f.items()}
  if not v["out"]:
    raise configlib.ConfigError("--out is required (a folder for audit.json and audit.png)")
  for name in ("image_size", "patch_size", "width", "num_images", "iters", "secagg_clients"):
    if v[name] < 1:
      raise configlib.ConfigError(f"--{name}={v[name]} must be >= 1")
  if v["image_size"] % v["patch_size"]:
    raise configlib.ConfigError(
      f"--image_size={v['image_size']} is not a multiple of --patch_size={v['patch_size']}"
    )
  if (v["image_size"] // v["patch_size"]) ** 2 < 4:
    raise configlib.ConfigError("--image_size / --patch_size must give at least 4 patches")
  os.makedirs(v["out"], exist_ok=True)
  used = {name: value for name, value in v.items() if name not in ("out", "verbose")}
  res = run_audit(**used)
  save_png(res.pop("images"), os.path.join(v["out"], "audit.png"))
  with open(os.path.join(v["out"], "audit.json"), "w") as out:
    json.dump({"flags": used, "results": res}, out, indent=2)
  for name, r in res.items():
    print(f"{name:8s} PSNR {r['psnr']:6.2f} dB  SSIM {r['ssim']:.3f}")


if __name__ == "__main__":
  _flags = define_flags()
  app.run(
    configlib.report_user_errors(lambda argv: main(argv, _flags), lambda: _flags["verbose"].value)
  )
