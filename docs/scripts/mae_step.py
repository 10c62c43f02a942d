"""The plain MAE training step that lane_axis_cost.py and step_profile.py time: loss + AdamW
(the `cpu` preset's optimizer), norm-pix loss, random 75% masks, no MIC.

  small: 64 px, encoder 192 x 6, decoder 128 x 2 (issue 17's first shape); b16: MAE-B/16, 224 px.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ultrajax.configs import pretrain_fed
from ultrajax.models import mae
from ultrajax.train import mim_objectives, optimizer


def build(batch: int, kind: str):
  """(config, params, tx, step, images): step(params, opt_state, images, key) -> (params,
  opt_state, loss); images [batch, size, size, 3] uint8."""
  config = pretrain_fed.get_config("cpu")
  m = config.model
  if kind == "b16":
    m.update(variant="B/16", image_size=224, decoder_width=512, decoder_depth=8, decoder_heads=16)
  else:
    m.update(width=192, depth=6, num_heads=3, decoder_width=128, decoder_depth=2, decoder_heads=4)
  m.norm_pix_loss = True
  config.ultramim.update(tgm_mode="random", mic=False)
  config.data.batch_size = batch
  config = config.copy_and_resolve_references()

  graphdef, params = nnx.split(mae.mae_from_config(config.model, nnx.Rngs(0)), nnx.Param)
  params = nnx.to_pure_dict(params)
  tx = optimizer.adamw(config.optim, params)
  loss_fn = mim_objectives.make_loss_fn(graphdef, config)
  size = config.model.image_size
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), np.uint8))

  def step(p, o, b, key):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, b, key)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  return config, params, tx, step, images
