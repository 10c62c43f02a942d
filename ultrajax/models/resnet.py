"""ResNet-18 (BasicBlock) in NNX, torchvision's layout, for HeteroSync Learning's encoders.

Parameter names mirror torchvision's `resnet18` (conv1, bn1, layer1..layer4.i.{conv1, bn1, conv2,
bn2, downsample_conv, downsample_bn}, fc), so a state dict copies over with a rename and kernel
transposes; with the same `num_classes` the parameter count equals torchvision's (11,689,512 for
1000 classes; BatchNorm running statistics are buffers there and `nnx.BatchStat` here).

Functional boundary: the model holds `nnx.Param` and, with norm='batch', `nnx.BatchStat` state.
Callers split both, `graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)`, and
merge inside jitted code; a training-mode call (`train=True`: batch statistics, running averages
updated) changes the merged module's BatchStat leaves, which the caller returns with
`nnx.state(model, nnx.BatchStat)`. norm='group' (GroupNorm, no running statistics) is the option
for tiny per-device batches or when no state besides parameters is wanted.

Small inputs: stem='imagenet' is torchvision's 7x7/2 conv + 3x3/2 max-pool (224 px -> 7x7 at the
end); stem='cifar' is a 3x3/1 conv without pooling, the usual choice for 32-64 px images. `width`
scales every stage (64 = ResNet-18; 16 gives a 0.7M-parameter model for CPU studies).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

NORMS = ("batch", "group")
STEMS = ("imagenet", "cifar")
BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # torch's momentum 0.1 is the weight of the new batch statistics.

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), an untruncated normal
# (jax's "normal" distribution is the untruncated one).
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch nn.Linear: U(+-1/sqrt(fan_in)) for the kernel; biases start at zero here.
fc_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv(cin: int, cout: int, size: int, stride: int, *, dtype, rngs: nnx.Rngs) -> nnx.Conv:
  """Bias-free conv with torch's symmetric padding size // 2 (Flax 'SAME' pads asymmetrically
  for stride 2, which would shift every feature map by a pixel against torchvision)."""
  pad = size // 2
  return nnx.Conv(
    cin,
    cout,
    (size, size),
    strides=stride,
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=conv_init,
    dtype=dtype,
    param_dtype=jnp.float32,
    rngs=rngs,
  )


def norm_layer(kind: str, channels: int, *, dtype, rngs: nnx.Rngs):
  if kind == "batch":
    return nnx.BatchNorm(
      channels,
      momentum=BN_MOMENTUM,
      epsilon=BN_EPS,
      dtype=dtype,
      param_dtype=jnp.float32,
      use_fast_variance=False,
      rngs=rngs,
    )
  # 32 groups as GroupNorm's paper, fewer when a narrow model has fewer channels.
  return nnx.GroupNorm(
    channels,
    num_groups=min(32, channels),
    epsilon=BN_EPS,
    dtype=dtype,
    param_dtype=jnp.float32,
    rngs=rngs,
  )


def _norm(layer, x, train: bool):
  if isinstance(layer, nnx.BatchNorm):
    return layer(x, use_running_average=not train)
  return layer(x)


class BasicBlock(nnx.Module):
  """relu(x' + bn2(conv2(relu(bn1(conv1(x)))))), x' = x or a strided 1x1 conv + norm."""

  def __init__(self, cin: int, cout: int, stride: int, *, norm: str, dtype, rngs: nnx.Rngs):
    self.conv1 = conv(cin, cout, 3, stride, dtype=dtype, rngs=rngs)
    self.bn1 = norm_layer(norm, cout, dtype=dtype, rngs=rngs)
    self.conv2 = conv(cout, cout, 3, 1, dtype=dtype, rngs=rngs)
    self.bn2 = norm_layer(norm, cout, dtype=dtype, rngs=rngs)
    self.has_downsample = stride != 1 or cin != cout
    if self.has_downsample:
      self.downsample_conv = conv(cin, cout, 1, stride, dtype=dtype, rngs=rngs)
      self.downsample_bn = norm_layer(norm, cout, dtype=dtype, rngs=rngs)

  def __call__(self, x, train: bool = False):
    """x: [B, H, W, Cin] -> [B, H / stride, W / stride, Cout]."""
    y = jax.nn.relu(_norm(self.bn1, self.conv1(x), train))
    y = _norm(self.bn2, self.conv2(y), train)
    if self.has_downsample:
      x = _norm(self.downsample_bn, self.downsample_conv(x), train)
    return jax.nn.relu(x + y)


class ResNet(nnx.Module):
  """ResNet with BasicBlocks; blocks=(2, 2, 2, 2) is ResNet-18, (3, 4, 6, 3) ResNet-34.

  __call__ returns pooled features [B, 8 * width] (num_classes=0) or logits [B, num_classes];
  float32 parameters and outputs, `dtype` computation.
  """

  def __init__(
    self,
    *,
    num_classes: int = 0,
    width: int = 64,
    blocks: Sequence[int] = (2, 2, 2, 2),
    norm: str = "batch",
    stem: str = "imagenet",
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    if norm not in NORMS:
      raise ValueError(f"norm={norm!r} is not one of {NORMS}")
    if stem not in STEMS:
      raise ValueError(f"stem={stem!r} is not one of {STEMS}")
    if len(blocks) != 4 or min(blocks) < 1 or width < 1:
      raise ValueError(f"blocks={tuple(blocks)} must be 4 positive counts and width={width} >= 1")
    self.stem, self.num_classes = stem, num_classes
    self.num_features = 8 * width
    size, stride = (7, 2) if stem == "imagenet" else (3, 1)
    self.conv1 = conv(3, width, size, stride, dtype=dtype, rngs=rngs)
    self.bn1 = norm_layer(norm, width, dtype=dtype, rngs=rngs)
    cin = width
    for i, n in enumerate(blocks):
      cout = width * 2**i
      stage = [
        BasicBlock(
          cin if j == 0 else cout,
          cout,
          2 if (i and j == 0) else 1,
          norm=norm,
          dtype=dtype,
          rngs=rngs,
        )
        for j in range(n)
      ]
      setattr(self, f"layer{i + 1}", nnx.List(stage))
      cin = cout
    if num_classes:
      self.fc = nnx.Linear(
        self.num_features,
        num_classes,
        kernel_init=fc_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
      )

  def stages(self, x, *, train: bool = False, start: int = 0, stop: int = 5):
    """Runs pieces [start, stop) of (stem, layer1, layer2, layer3, layer4) on x [B, H, W, C]
    -> [B, H', W', C']: the cut used by split learning (SplitAVG) between client and server."""
    if not 0 <= start <= stop <= 5:
      raise ValueError(f"stages [{start}, {stop}) are not within the 5 pieces of a ResNet")
    for piece in range(start, stop):
      if piece == 0:
        x = jax.nn.relu(_norm(self.bn1, self.conv1(x), train))
        if self.stem == "imagenet":
          x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
      else:
        for block in getattr(self, f"layer{piece}"):
          x = block(x, train)
    return x

  def features(self, images, *, train: bool = False):
    """images: [B, H, W, C] (normalised) -> globally average-pooled features [B, 8 * width]."""
    return self.stages(images, train=train).mean(axis=(1, 2))

  def __call__(self, images, *, train: bool = False):
    """images: [B, H, W, C] -> features [B, 8 * width] or logits [B, num_classes], float32."""
    x = self.features(images, train=train)
    if self.num_classes:
      x = self.fc(x)
    return x.astype(jnp.float32)
