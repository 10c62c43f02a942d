"""The PyTorch peer of `bench pretrain`: an MAE as facebookresearch/mae's `models_mae.py` builds
it (timm `Block`s, written here from its documented structure, not copied), and its training
step as the recipe's `engine_pretrain.py` takes it (`recipe_step`), timed.

Structure: conv patch embedding; fixed 2-D sin-cos positions (ultrajax.models.posemb, the table
MAE uses) with a zero cls row; random masking by argsort of uniform noise (keep the first
int(N (1 - mask_ratio)) patches, cls token prepended after masking); encoder blocks and final
norm; decoder embedding, mask tokens un-shuffled by the inverse permutation, decoder positions,
decoder blocks, norm and linear prediction; per-patch MSE (norm-pix optional, unbiased
variance) averaged over the masked patches. AdamW with MAE's betas and no weight decay on
biases and norms. torch and timm are the optional `torch` extra: importing this module without
them raises ImportError.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import time

import numpy as np
import torch
from timm.models.vision_transformer import Block
from torch import nn

from ultrajax.models import posemb


class TorchMAE(nn.Module):
  """MAE with timm blocks. images: [B, 3, H, W] float -> (loss, pred [B, N, p*p*3], mask [B, N])."""

  def __init__(
    self,
    *,
    image_size: int,
    patch_size: int,
    width: int,
    depth: int,
    num_heads: int,
    decoder_width: int,
    decoder_depth: int,
    decoder_heads: int,
    mlp_ratio: float = 4.0,
    mask_ratio: float = 0.75,
    norm_pix_loss: bool = True,
  ):
    super().__init__()
    self.p, self.mask_ratio, self.norm_pix_loss = patch_size, mask_ratio, norm_pix_loss
    grid = image_size // patch_size
    norm = functools.partial(nn.LayerNorm, eps=1e-6)
    self.patch_embed = nn.Conv2d(3, width, patch_size, stride=patch_size)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    table = lambda d: torch.from_numpy(
      np.asarray(posemb.sincos_2d(grid, grid, d, cls_token=True), np.float32)
    )[None]
    self.register_buffer("pos_embed", table(width), persistent=False)  # fixed, not trained
    block = functools.partial(Block, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm)
    self.blocks = nn.ModuleList([block(width, num_heads) for _ in range(depth)])
    self.norm = norm(width)
    self.decoder_embed = nn.Linear(width, decoder_width)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
    self.register_buffer("decoder_pos_embed", table(decoder_width), persistent=False)
    self.decoder_blocks = nn.ModuleList(
      [block(decoder_width, decoder_heads) for _ in range(decoder_depth)]
    )
    self.decoder_norm = norm(decoder_width)
    self.decoder_pred = nn.Linear(decoder_width, patch_size * patch_size * 3)
    self._init()

  def _init(self):
    # MAE: xavier on the conv viewed as a linear map, normal(0.02) tokens, xavier-uniform
    # linears with zero biases, unit LayerNorms.
    w = self.patch_embed.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.normal_(self.cls_token, std=0.02)
    nn.init.normal_(self.mask_token, std=0.02)
    for m in self.modules():
      if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
          nn.init.zeros_(m.bias)
      elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

  def patchify(self, images):
    """[B, 3, H, W] -> [B, N, p*p*3], each patch flattened (row, column, channel)."""
    b, c, h, w = images.shape
    p = self.p
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

  def forward(self, images):
    x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
    b, n, d = x.shape
    keep = int(n * (1 - self.mask_ratio))
    shuffle = torch.argsort(torch.rand(b, n, device=x.device), dim=1)
    restore = torch.argsort(shuffle, dim=1)
    x = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, restore)  # 1 = masked, in patch order
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
    x = torch.cat([cls, x], dim=1)
    for block in self.blocks:
      x = block(x)
    x = self.decoder_embed(self.norm(x))
    tokens = torch.cat([x[:, 1:], self.mask_token.expand(b, n - keep, -1)], dim=1)
    tokens = torch.gather(tokens, 1, restore[..., None].expand(-1, -1, x.shape[2]))
    x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
    for block in self.decoder_blocks:
      x = block(x)
    pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
    target = self.patchify(images)
    if self.norm_pix_loss:
      target = (target - target.mean(-1, keepdim=True)) / (
        target.var(-1, keepdim=True) + 1e-6
      ) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum(), pred, mask


def adamw(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)):
  """AdamW with MAE's parameter groups: no decay on biases and norms (1-D tensors)."""
  decay = [p for p in model.parameters() if p.ndim > 1]
  rest = [p for p in model.parameters() if p.ndim <= 1]
  return torch.optim.AdamW(
    [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)],
    lr=lr,
    betas=betas,
  )


def recipe_lr(step: int, peak: float, warmup: int, total: int) -> float:
  """MAE's `util/lr_sched.adjust_learning_rate` per step: linear warm-up over `warmup` steps from
  0, then a half-cycle cosine from `peak` to 0 at `total`."""
  if step < warmup:
    return peak * step / warmup
  return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def recipe_step(model: nn.Module, opt, images, lr: float, *, bfloat16: bool = False):
  """One step as facebookresearch/mae's `engine_pretrain.train_one_epoch` takes it (accum_iter
  1): lr set on every group; forward; the loss read back and checked finite (the recipe exits on
  a non-finite loss); backward; the gradient's global L2 norm (`NativeScalerWithGradNormCount`
  with clip_grad None: a norm per tensor, then the norm of those; its GradScaler is disabled
  without CUDA); AdamW; zero_grad. Returns (loss, gradient norm) as floats."""
  for group in opt.param_groups:
    group["lr"] = lr
  with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bfloat16):
    loss = model(images)[0]
  loss_value = loss.item()
  if not math.isfinite(loss_value):
    raise FloatingPointError(f"PyTorch MAE peer: loss is {loss_value}")
  loss.backward()
  grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
  norm = torch.norm(torch.stack([torch.norm(g, 2.0) for g in grads]), 2.0)
  opt.step()
  opt.zero_grad(set_to_none=True)
  return loss_value, norm.item()


class RecipeRun:
  """The peer built once and timed on demand: model, AdamW and `batch` random images on CUDA if
  present (else the CPU, denormals flushed as XLA:CPU does), after two warm-up steps. The lr
  follows `recipe_lr` (warm-up over the first step, then cosine to `total_steps`).
  bfloat16: autocast (parameters stay float32)."""

  def __init__(
    self,
    model_kwargs: dict,
    *,
    batch: int,
    total_steps: int,
    bfloat16: bool,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
  ):
    self.device = "cuda" if torch.cuda.is_available() else "cpu"
    # XLA:CPU computes with denormals flushed to zero; so does the peer (without it, at the cpu
    # preset's lr the MAE-B/16 step ran 11% slower after a few steps).
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    self.model = TorchMAE(**model_kwargs).to(self.device)
    self.opt = adamw(self.model, lr, weight_decay)
    s = model_kwargs["image_size"]
    self.images = torch.randn(batch, 3, s, s, device=self.device)
    self.batch, self.bfloat16, self.lr, self.total = batch, bfloat16, lr, total_steps + 2
    self.step_index = 0
    self._run(2)

  def _run(self, steps: int) -> float:
    for _ in range(steps):
      lr = recipe_lr(self.step_index, self.lr, 1, self.total)
      loss, _ = recipe_step(self.model, self.opt, self.images, lr, bfloat16=self.bfloat16)
      self.step_index += 1
    if self.device == "cuda":
      torch.cuda.synchronize()
    return loss

  def time(self, steps: int) -> dict:
    """img/s, ms per step and process CPU ms per image over `steps` more steps."""
    t0, c0 = time.perf_counter(), time.process_time()
    loss = self._run(steps)
    dt = (time.perf_counter() - t0) / steps
    return dict(
      img_per_s=self.batch / dt,
      ms_per_step=1e3 * dt,
      cpu_ms_per_img=1e3 * (time.process_time() - c0) / (steps * self.batch),
      loss=loss,
      device=self.device,
      threads=torch.get_num_threads(),
      pid=os.getpid(),
    )


def _serve(conn, model_kwargs: dict, kwargs: dict) -> None:
  """PeerProcess's side: build the RecipeRun, then time as many steps as asked until 0."""
  try:
    run = RecipeRun(model_kwargs, **kwargs)
    conn.send(None)
    while steps := conn.recv():
      conn.send(run.time(steps))
  except Exception as e:  # the parent re-raises it
    conn.send(e)


class PeerProcess:
  """A RecipeRun in a spawned process, timed on demand with `time(steps)`, so that `bench
  pretrain` can alternate it with ultrajax's timings (the machine's speed drifted by 20-30%
  within minutes on 2026-12-02). In the bench's own process, after XLA's programs ran, the
  peer's step was 2-8% (64 px) to 5-20% (B/16) slower than alone (docs/benchmarks.md,
  2026-12-02), hence a process of its own. Use as a context manager."""

  def __init__(self, model_kwargs: dict, **kwargs):
    ctx = multiprocessing.get_context("spawn")
    self._conn, child = ctx.Pipe()
    self._process = ctx.Process(target=_serve, args=(child, model_kwargs, kwargs), daemon=True)
    self._process.start()
    self._reply()

  def _reply(self):
    reply = self._conn.recv()
    if isinstance(reply, Exception):
      raise reply
    return reply

  def time(self, steps: int) -> dict:
    self._conn.send(steps)
    return self._reply()

  def close(self) -> None:
    if self._process.is_alive():
      self._conn.send(0)
      self._process.join(timeout=60)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def time_in_fresh_process(model_kwargs: dict, *, steps: int, **kwargs) -> dict:
  """`steps` timed steps of a RecipeRun in a spawned process (PeerProcess), after its warm-up."""
  with PeerProcess(model_kwargs, total_steps=steps, **kwargs) as peer:
    return peer.time(steps)
