"""A Flax twin of transformers' `ResNetModel` (torch), built to load its weights.

The module tree mirrors the torch one name for name (`embedder/embedder/
convolution`, `encoder/stages_0/layers_1/layer_0/normalization`, ...), so a
torch state_dict key maps to a Flax path by turning `.N.` into `_N/`; the
per-layer layout rules live in `bridge.vla_loading`.

Conventions that matter for parity with torch:
- images are NHWC here (NCHW in torch); convolutions pad explicitly by
  `kernel // 2` on both sides like torch (not "SAME", which pads asymmetrically
  for stride 2 on even sizes);
- max pooling pads with -inf, like torch's `MaxPool2d(3, 2, padding=1)`;
- BatchNorm always runs in inference mode on its running statistics
  (collection `batch_stats`, epsilon 1e-5 as in torch). For RL fine-tuning the
  statistics stay frozen: PPO minibatches are small and highly correlated
  (consecutive frames of a few environments), so re-estimating batch statistics
  would drift them away from the pretraining distribution and would also make a
  sample's action depend on which other samples share its minibatch. Treat
  `batch_stats` as non-trainable state; only `params` (BN scale/bias included)
  are optimised.

How convolutions and pooling are computed (`ResNetConfig.conv_impl`, default
"auto"): XLA:CPU runs a convolution's kernel gradient 35-170x slower when it
sits inside a while loop (jax-ml/jax#12868), and PPO's update is a nested
`lax.scan`. On the CPU backend the convolutions and the stem's max pool
therefore use `cpu_ops`: XLA's forward, a backward written as canonical
forward convolutions (and compares/selects for the pool) that XLA runs at full
speed in loops. On GPU/TPU ("auto" -> "xla") XLA's own ops are used
throughout. The choice changes no parameter name, shape or layout, and the
forward output not at all.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

from jaxrl_vla.models.vla.cpu_ops import conv_general_dilated_cpu, max_pool_cpu

BN_EPSILON = 1e-5  # torch.nn.BatchNorm2d default
_ACTIVATIONS = {"relu": nn.relu, "gelu": lambda x: nn.gelu(x, approximate=False), "silu": nn.silu}
CONV_IMPLS = ("auto", "xla", "cpu")
# The activation inside a residual layer, after its first convolution(s): transformers builds those
# ResNetConvLayers with their default activation, ReLU, whatever `hidden_act` says; `hidden_act` acts
# only in the stem and after each residual sum. Matching that (not applying hidden_act everywhere) is
# what makes a gelu/silu checkpoint give the torch model's features.
INNER_ACTIVATION = "relu"


def check_conv_impl(conv_impl: str) -> None:
    """ValueError unless `conv_impl` is one of CONV_IMPLS (the config's and the layers' check)."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {list(CONV_IMPLS)}, got {conv_impl!r}")


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """The fields of transformers' `ResNetConfig` that shape the network.

    `to_hf_kwargs()` gives the keyword arguments for the torch config, so the
    two twins are always built from one description.

    `conv_impl` is not part of the network (torch has no such field, and it
    changes no parameter): how the Flax twin computes its convolutions and
    its max pool. "xla": `lax.conv_general_dilated` and `nn.max_pool`. "cpu":
    the same forward with backward passes XLA:CPU runs at full speed inside
    `lax.scan` loops such as PPO's update (`cpu_ops`; XLA's own conv kernel
    gradient is 35-170x slower there, jax-ml/jax#12868). "auto" (default):
    "cpu" when `jax.default_backend()` is "cpu" at trace time, else "xla".
    """

    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    depths: tuple[int, ...] = (3, 4, 6, 3)
    layer_type: str = "bottleneck"  # "basic" (resnet18/34) | "bottleneck" (resnet50+)
    hidden_act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    conv_impl: str = "auto"  # "auto" | "xla" | "cpu"; see the class docstring

    def __post_init__(self) -> None:
        if self.layer_type not in ("basic", "bottleneck"):
            raise ValueError(f"layer_type must be 'basic' or 'bottleneck', got {self.layer_type!r}")
        if len(self.hidden_sizes) != len(self.depths) or not self.depths:
            raise ValueError(
                f"hidden_sizes {self.hidden_sizes} and depths {self.depths} must be non-empty and of equal length"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}")
        check_conv_impl(self.conv_impl)

    @property
    def output_dim(self) -> int:
        """Channels of the pooled feature vector."""
        return self.hidden_sizes[-1]

    def to_hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `transformers.ResNetConfig` describing the same network."""
        out = dataclasses.asdict(self)
        del out["conv_impl"]  # how Flax computes, not what: torch has no such field
        out["hidden_sizes"] = list(self.hidden_sizes)
        out["depths"] = list(self.depths)
        return out


RESNET_PRESETS: dict[str, ResNetConfig] = {
    "resnet18": ResNetConfig(
        embedding_size=64, hidden_sizes=(64, 128, 256, 512), depths=(2, 2, 2, 2), layer_type="basic"
    ),
    "resnet34": ResNetConfig(
        embedding_size=64, hidden_sizes=(64, 128, 256, 512), depths=(3, 4, 6, 3), layer_type="basic"
    ),
    "resnet50": ResNetConfig(
        embedding_size=64, hidden_sizes=(256, 512, 1024, 2048), depths=(3, 4, 6, 3), layer_type="bottleneck"
    ),
    "tiny": ResNetConfig(embedding_size=8, hidden_sizes=(8, 16), depths=(1, 1), layer_type="basic"),
}


def resnet_config(name: str, **overrides: Any) -> ResNetConfig:
    """A preset ("resnet18" | "resnet34" | "resnet50" | "tiny") with fields replaced by `overrides`."""
    if name not in RESNET_PRESETS:
        raise ValueError(f"unknown ResNet preset {name!r}; choose one of {sorted(RESNET_PRESETS)}")
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if v is not None}
    return dataclasses.replace(RESNET_PRESETS[name], **overrides)


def _conv_init() -> nn.initializers.Initializer:
    """Kaiming-normal, fan-out, as transformers initialises ResNet convolutions."""
    return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _resolve_conv_impl(conv_impl: str) -> str:
    """What `conv_impl` means ("xla" or "cpu") on the backend being traced for: "auto" resolved here."""
    check_conv_impl(conv_impl)
    if conv_impl == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return conv_impl


def conv_function(conv_impl: str) -> Any:
    """The `conv_general_dilated` for `nn.Conv` that `conv_impl` names."""
    return conv_general_dilated_cpu if _resolve_conv_impl(conv_impl) == "cpu" else lax.conv_general_dilated


def max_pool_function(conv_impl: str) -> Any:
    """`f(x, window_shape, strides, padding)`: the max pool that `conv_impl` names (explicit -inf padding)."""
    if _resolve_conv_impl(conv_impl) == "cpu":
        return max_pool_cpu
    return lambda x, window_shape, strides, padding: nn.max_pool(x, window_shape, strides=strides, padding=padding)


def _needs_shortcut(in_channels: int, out_channels: int, stride: int) -> bool:
    """A residual needs projecting when the layer changes its width or resolution."""
    return in_channels != out_channels or stride != 1


class ResNetConvLayer(nn.Module):
    """Conv (no bias) -> BatchNorm (running stats) -> optional activation."""

    out_channels: int
    kernel_size: int = 3
    stride: int = 1
    activation: str | None = "relu"
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = self.kernel_size // 2
        x = nn.Conv(
            self.out_channels,
            (self.kernel_size, self.kernel_size),
            strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            kernel_init=_conv_init(),
            dtype=self.dtype,
            conv_general_dilated=conv_function(self.conv_impl),
            name="convolution",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, dtype=self.dtype, name="normalization")(x)
        return x if self.activation is None else _ACTIVATIONS[self.activation](x)


class ResNetShortCut(nn.Module):
    """1x1 projection (+ stride) of the residual when shape changes."""

    out_channels: int
    stride: int = 2
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.out_channels,
            (1, 1),
            strides=(self.stride, self.stride),
            padding="VALID",
            use_bias=False,
            kernel_init=_conv_init(),
            dtype=self.dtype,
            conv_general_dilated=conv_function(self.conv_impl),
            name="convolution",
        )(x)
        return nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, dtype=self.dtype, name="normalization")(x)


class ResNetBasicLayer(nn.Module):
    """Two 3x3 convolutions with a residual connection (resnet18/34).

    `activation` (the config's hidden_act) follows the residual sum; between the
    convolutions it is always ReLU (INNER_ACTIVATION), as in transformers.
    """

    in_channels: int
    out_channels: int
    stride: int = 1
    activation: str = "relu"
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    def setup(self) -> None:
        conv = dict(dtype=self.dtype, conv_impl=self.conv_impl)
        if _needs_shortcut(self.in_channels, self.out_channels, self.stride):
            self.shortcut = ResNetShortCut(self.out_channels, self.stride, **conv)
        self.layer = [
            ResNetConvLayer(self.out_channels, stride=self.stride, activation=INNER_ACTIVATION, **conv),
            ResNetConvLayer(self.out_channels, activation=None, **conv),
        ]

    def __call__(self, x: jax.Array) -> jax.Array:
        residual = self.shortcut(x) if _needs_shortcut(self.in_channels, self.out_channels, self.stride) else x
        for conv in self.layer:
            x = conv(x)
        return _ACTIVATIONS[self.activation](x + residual)


class ResNetBottleNeckLayer(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand with a residual connection (resnet50+).

    The stride sits on the 3x3 convolution (ResNet v1.5) unless
    `downsample_in_bottleneck`, which moves it to the first 1x1 as in the
    original paper, exactly like transformers. `activation` (hidden_act) follows
    the residual sum; between the convolutions it is ReLU (INNER_ACTIVATION).
    """

    in_channels: int
    out_channels: int
    stride: int = 1
    activation: str = "relu"
    reduction: int = 4
    downsample_in_bottleneck: bool = False
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    def setup(self) -> None:
        reduced = self.out_channels // self.reduction
        conv = dict(dtype=self.dtype, conv_impl=self.conv_impl)
        if _needs_shortcut(self.in_channels, self.out_channels, self.stride):
            self.shortcut = ResNetShortCut(self.out_channels, self.stride, **conv)
        first_stride = self.stride if self.downsample_in_bottleneck else 1
        middle_stride = 1 if self.downsample_in_bottleneck else self.stride
        self.layer = [
            ResNetConvLayer(reduced, kernel_size=1, stride=first_stride, activation=INNER_ACTIVATION, **conv),
            ResNetConvLayer(reduced, stride=middle_stride, activation=INNER_ACTIVATION, **conv),
            ResNetConvLayer(self.out_channels, kernel_size=1, activation=None, **conv),
        ]

    def __call__(self, x: jax.Array) -> jax.Array:
        residual = self.shortcut(x) if _needs_shortcut(self.in_channels, self.out_channels, self.stride) else x
        for conv in self.layer:
            x = conv(x)
        return _ACTIVATIONS[self.activation](x + residual)


class ResNetStage(nn.Module):
    """`depth` layers; only the first changes width and stride."""

    config: ResNetConfig
    in_channels: int
    out_channels: int
    stride: int
    depth: int
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        layers = []
        for i in range(self.depth):
            in_ch = self.in_channels if i == 0 else self.out_channels
            stride = self.stride if i == 0 else 1
            if cfg.layer_type == "bottleneck":
                layers.append(
                    ResNetBottleNeckLayer(
                        in_ch,
                        self.out_channels,
                        stride=stride,
                        activation=cfg.hidden_act,
                        # transformers passes the flag to the first layer only; later layers have stride 1,
                        # where it makes no difference.
                        downsample_in_bottleneck=cfg.downsample_in_bottleneck and i == 0,
                        dtype=self.dtype,
                        conv_impl=cfg.conv_impl,
                    )
                )
            else:
                layers.append(
                    ResNetBasicLayer(
                        in_ch, self.out_channels, stride, cfg.hidden_act, dtype=self.dtype, conv_impl=cfg.conv_impl
                    )
                )
        self.layers = layers

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class ResNetEmbeddings(nn.Module):
    """The stem: 7x7/2 conv + BN + activation, then 3x3/2 max pool."""

    config: ResNetConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        if pixel_values.shape[-1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[-1]} channels (last axis, NHWC) but the config expects "
                f"{self.config.num_channels}"
            )
        x = ResNetConvLayer(
            self.config.embedding_size,
            kernel_size=7,
            stride=2,
            activation=self.config.hidden_act,
            dtype=self.dtype,
            conv_impl=self.config.conv_impl,
            name="embedder",
        )(pixel_values)
        return max_pool_function(self.config.conv_impl)(x, (3, 3), (2, 2), ((1, 1), (1, 1)))


class ResNetEncoder(nn.Module):
    """The stages; the first downsamples only if `downsample_in_first_stage`."""

    config: ResNetConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        in_sizes = (cfg.embedding_size,) + tuple(cfg.hidden_sizes[:-1])
        self.stages = [
            ResNetStage(
                cfg,
                in_ch,
                out_ch,
                stride=(2 if cfg.downsample_in_first_stage else 1) if i == 0 else 2,
                depth=depth,
                dtype=self.dtype,
            )
            for i, (in_ch, out_ch, depth) in enumerate(zip(in_sizes, cfg.hidden_sizes, cfg.depths))
        ]

    def __call__(self, x: jax.Array) -> jax.Array:
        for stage in self.stages:
            x = stage(x)
        return x


class ResNetModel(nn.Module):
    """ResNet backbone: NHWC float pixels -> (pooled [B, C], last hidden state [B, h, w, C]).

    Pixel preprocessing (scaling, normalisation) is the caller's business, as
    for transformers' `ResNetModel`. BatchNorm uses running statistics; see the
    module docstring for why.
    """

    config: ResNetConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.embedder = ResNetEmbeddings(self.config, dtype=self.dtype)
        self.encoder = ResNetEncoder(self.config, dtype=self.dtype)

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        hidden = self.encoder(self.embedder(pixel_values))
        pooled = jnp.mean(hidden.astype(jnp.float32), axis=(1, 2))
        return pooled, hidden
