"""Prompted classification (UltraSam, paper section 2.3): classify the instance a prompt points at.

  E_o  UltraSam's image encoder, frozen: object-centric tokens [N, g, g, C]. They are an input
       here (the job computes them once per image), so no gradient can reach E_o.
  E_g  a trainable ViT on the same image: its patch tokens, projected to C and resampled to the
       g x g grid, are added to E_o's tokens; its cls token after the final norm is the global
       embedding z_g [N, D_g].
  decoder  SAM's prompt encoder and two-way mask decoder (initialised from UltraSam, fine-tuned)
       with one extra classification token, decoded jointly with the prompt tokens and the
       summed image tokens.
  head  Linear(concat[classification token output (C), z_g]) -> class logits.

global_encoder=None is the variant without E_g (ultrajax's earlier one, `frozen` in the config):
nothing is added to E_o's tokens and z_g is the mean of E_o's tokens. The paper does not give
E_g's architecture or initialisation; UltraSam's public code has no wired prompted classifier
(research/seed_systems.md section 3.5), so there is no official variant to reproduce.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ultrajax.models import sam as sam_lib, teacher, vit

GLOBAL_ENCODERS = ("trainable", "frozen")


class PromptedClassifier(nnx.Module):
  """See the module docstring. Call with E_o's tokens, the preprocessed images and the prompts."""

  def __init__(
    self,
    sam_config: sam_lib.SamConfig,
    num_classes: int,
    *,
    global_encoder: vit.ViT | None,
    dtype=jnp.float32,
    attention_impl: str = "dot_product",
    rngs: nnx.Rngs,
  ):
    """attention_impl: the SAM mask decoder's (sam.DecoderAttention's impl)."""
    if global_encoder is not None and global_encoder.pool != "none":
      raise ValueError(
        "the global encoder E_g must be a ViT with pool='none' (its tokens are used)"
      )
    config = dataclasses.replace(sam_config, num_cls_tokens=1)
    dim = config.prompt_dim
    self.grid, self.image_size = config.grid, config.image_size
    self.prompt_encoder = sam_lib.PromptEncoder(config, dtype=dtype, rngs=rngs)
    self.mask_decoder = sam_lib.MaskDecoder(
      config, dtype=dtype, attention_impl=attention_impl, rngs=rngs
    )
    self.global_encoder = global_encoder
    if global_encoder is not None:
      self.token_proj = vit.linear(global_encoder.width, dim, dtype=dtype, rngs=rngs)
    z_dim = dim if global_encoder is None else global_encoder.width
    self.head = nnx.Linear(dim + z_dim, num_classes, rngs=rngs)

  def global_features(self, images):
    """images: [N, S, S, 3] (sam.preprocess'ed) -> E_g's tokens on the SAM grid [N, g, g, C]
    and z_g [N, D_g], float32. Images are resized (antialiased bilinear) to E_g's input."""
    eg = self.global_encoder
    size = eg.image_size
    if images.shape[1:3] != (size, size):
      images = jax.image.resize(images, (images.shape[0], size, size, 3), "linear", antialias=True)
    tokens = eg(images)  # [N, 1 + M, D_g] after the final norm
    patches = teacher.align_tokens(self.token_proj(tokens[:, 1:]), self.grid, "interpolate")
    patches = patches.reshape(patches.shape[0], self.grid, self.grid, -1)
    return patches.astype(jnp.float32), tokens[:, 0]

  def __call__(self, object_tokens, images, coords, labels):
    """object_tokens: [N, g, g, C] (E_o); images: [N, S, S, 3] preprocessed (unused without
    E_g); coords [N, T, 2], labels [N, T]: prompt tokens as PromptEncoder.embed_points ->
    logits [N, num_classes] float32."""
    pe = self.prompt_encoder
    sparse = pe.embed_points(coords, labels)
    n = sparse.shape[0]
    dense = jnp.broadcast_to(pe.no_mask[...].reshape(1, 1, 1, -1), (n, pe.grid, pe.grid, pe.dim))
    if self.global_encoder is None:
      image, z_g = object_tokens, object_tokens.mean((1, 2))
    else:
      tokens, z_g = self.global_features(images)
      image = object_tokens + tokens
    out = self.mask_decoder(image, pe.dense_pe(), sparse, dense)
    return self.head(jnp.concatenate([out.cls_tokens[:, 0], z_g], axis=-1)).astype(jnp.float32)


def load_sam_parts(classifier: PromptedClassifier, sam_params: dict) -> None:
  """Copies UltraSam's prompt encoder and mask decoder (a Sam pure dict) into `classifier`;
  the classification token, E_g, the projection and the head keep their initial values."""
  state = nnx.state(classifier, nnx.Param)
  params = nnx.to_pure_dict(state)
  params["prompt_encoder"] = sam_params["prompt_encoder"]
  params["mask_decoder"] = dict(
    sam_params["mask_decoder"], cls_tokens=params["mask_decoder"]["cls_tokens"]
  )
  nnx.replace_by_pure_dict(state, params)
  nnx.update(classifier, state)
