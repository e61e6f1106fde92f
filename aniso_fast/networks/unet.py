"""EDM-compatible DDPM++ / NCSN++ U-Net (`SongUNet`), the base network F_theta of METHOD §3.1.

Parameter names and shapes follow NVlabs/edm `training/networks.py:SongUNet` exactly, so the `model.*` tensors of an
official EDM network pickle load with `load_state_dict(strict=True)` (see `aniso_fast.edm_pickle`). The forward pass
computes the same function as EDM's, written without in-place ops and without a custom attention backward, so
`torch.autograd.grad(..., create_graph=True)` through the net can be differentiated again (the schedule-gradient
estimator of METHOD §5 needs that).

Layers cast their weights to the input dtype, as EDM's do: the net runs in whatever floating dtype `x` has (fp32 in
training and sampling; fp64 is handy for gradient checks).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.nn.functional import silu

from ..ops.norm import group_norm, is_nhwc

__all__ = [
    "Linear",
    "Conv2d",
    "GroupNorm",
    "PositionalEmbedding",
    "FourierEmbedding",
    "UNetBlock",
    "SongUNet",
    "fashion_mnist_unet",
]


def _xavier_uniform(shape: Sequence[int], fan_in: int, fan_out: int, gain: float = 1.0) -> Tensor:
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(*shape) * 2 - 1) * bound


class Linear(torch.nn.Module):
    """Fully connected layer: `weight [out, in]`, optional `bias [out]`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_weight: float = 1.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        weight = _xavier_uniform([out_features, in_features], in_features, out_features, init_weight)
        self.weight = torch.nn.Parameter(weight)
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), b)


class Conv2d(torch.nn.Module):
    """Square convolution with optional 2x up/downsampling by a separable FIR filter.

    `kernel=0` gives a pure resampling layer with no weights. The filter buffer `resample_filter [1, 1, f, f]`
    exists only when `up` or `down` is set (EDM registers it as None otherwise, which keeps it out of the state dict).
    `fused_resample` convolves at full resolution and then downsamples (or upsamples and then convolves), padding
    for both at once, as the NCSN++ residual encoder does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[int] = (1, 1), fused_resample: bool = False,
                 init_weight: float = 1.0):
        if up and down:
            raise ValueError("Conv2d: up and down are mutually exclusive")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        self.weight = (torch.nn.Parameter(_xavier_uniform([out_channels, in_channels, kernel, kernel], fan_in, fan_out,
                                                          init_weight)) if kernel else None)
        self.bias = torch.nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()  # 2-D filter with unit sum
        self.register_buffer("resample_filter", f if up or down else None)
        # a 2-tap box filter ([1, 1], DDPM++'s): 2x upsampling by it is nearest-neighbour, exactly (each output
        # pixel is one input pixel times 1), which is far faster than the depthwise transposed convolution in bf16
        self.nearest_up = up and len(resample_filter) == 2 and resample_filter[0] == resample_filter[1]

    def _down(self, x: Tensor, f: Tensor, pad: int) -> Tensor:
        c = x.shape[1]
        return torch.nn.functional.conv2d(x, f.expand(c, 1, -1, -1), groups=c, stride=2, padding=pad)

    def _up(self, x: Tensor, f: Tensor, pad: int) -> Tensor:
        if self.nearest_up and pad == 0:
            return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        c = x.shape[1]
        return torch.nn.functional.conv_transpose2d(x, (f * 4).expand(c, 1, -1, -1), groups=c, stride=2, padding=pad)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = torch.nn.functional.conv2d(self._up(x, f, w_pad + f_pad), w)
        elif self.fused_resample and self.down and w is not None:
            x = self._down(torch.nn.functional.conv2d(x, w, padding=w_pad + f_pad), f, 0)
        else:
            if self.up:
                x = self._up(x, f, f_pad)
            if self.down:
                x = self._down(x, f, f_pad)
            if w is not None and self.bias is not None and is_nhwc(x):
                # channels_last (networks.execution's fast layout): the bias goes into the convolution, which adds
                # it in its accumulator, one pass fewer; the contiguous path keeps EDM's separate add, bit for bit
                return torch.nn.functional.conv2d(x, w, self.bias.to(x.dtype), padding=w_pad)
            if w is not None:
                x = torch.nn.functional.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(torch.nn.Module):
    """Group normalization with at most 32 groups and at least `min_channels_per_group` channels per group."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor, silu: bool = False) -> Tensor:
        """group_norm(x), then SiLU when `silu` (one fused pass for channels_last CPU tensors: `ops.norm`)."""
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=silu)


class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding of a scalar: `[cos(x w_i), sin(x w_i)]` with `w_i = (1/max_positions)^(i/n)`."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features of a scalar (NCSN++): `[cos(2 pi x f_i), sin(2 pi x f_i)]`, `f_i ~ N(0, scale^2)`."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class UNetBlock(torch.nn.Module):
    """DDPM++ residual block (EDM's `UNetBlock` with SongUNet's settings): additive embedding (no adaptive scale),
    1x1 projection on the skip path whenever the shape changes, optional single-head self-attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, dropout: float = 0.0, skip_scale: float = math.sqrt(0.5), eps: float = 1e-6,
                 resample_filter: Sequence[int] = (1, 1)):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = 1 if attention else 0
        self.dropout = dropout
        self.skip_scale = skip_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, init_weight=1e-5)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, kernel=1, up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, init_weight=math.sqrt(0.2))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, init_weight=1e-5)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        x = self.conv0(self.norm0(x, silu=True))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        x = self.norm1(x + params, silu=True)
        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            b, c = x.shape[:2]
            # EDM's channel layout of qkv: [head, channel, (q, k, v)]
            q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            dt = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 (fp64 for fp64), as EDM's AttentionOp
            w = torch.einsum("ncq,nck->nqk", q.to(dt), (k / math.sqrt(k.shape[1])).to(dt)).softmax(dim=2).to(q.dtype)
            a = torch.einsum("nqk,nck->ncq", w, v)
            x = (self.proj(a.reshape(x.shape)) + x) * self.skip_scale
        return x


class SongUNet(torch.nn.Module):
    """DDPM++ / NCSN++ U-Net with EDM's constructor, defaults, parameter names and forward signature.

    `forward(x [B, in_channels, R, R], noise_labels [B], class_labels [B, label_dim] or None, augment_labels=None)`
    returns `[B, out_channels, R, R]`. `img_resolution` must be divisible by `2 ** (len(channel_mult) - 1)`
    (28 with three levels gives 28, 14, 7). DDPM++: `embedding_type='positional', channel_mult_noise=1,
    encoder_type='standard', resample_filter=[1, 1]`; NCSN++: `'fourier', 2, 'residual', [1, 3, 3, 1]`.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[int] = (1, 1),
    ):
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        channel_mult = [int(m) for m in channel_mult]
        attn_resolutions = [int(r) for r in attn_resolutions]
        resample_filter = [int(v) if float(v).is_integer() else float(v) for v in resample_filter]
        if not channel_mult:
            raise ValueError("channel_mult must have at least one level")
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution={img_resolution} is not divisible by 2**(len(channel_mult)-1)="
                             f"{1 << (len(channel_mult) - 1)}; the U-Net halves it {len(channel_mult) - 1} times")
        if label_dim < 0 or augment_dim < 0:
            raise ValueError(f"label_dim and augment_dim must be >= 0, got {label_dim}, {augment_dim}")
        super().__init__()
        self._config = dict(
            img_resolution=int(img_resolution), in_channels=int(in_channels), out_channels=int(out_channels),
            label_dim=int(label_dim), augment_dim=int(augment_dim), model_channels=int(model_channels),
            channel_mult=channel_mult, channel_mult_emb=int(channel_mult_emb), num_blocks=int(num_blocks),
            attn_resolutions=attn_resolutions, dropout=float(dropout), label_dropout=float(label_dropout),
            embedding_type=embedding_type, channel_mult_noise=int(channel_mult_noise), encoder_type=encoder_type,
            decoder_type=decoder_type, resample_filter=resample_filter,
        )
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block = dict(emb_channels=emb_channels, dropout=dropout, resample_filter=resample_filter)

        # Mapping network: noise level (+ class label + augmentation label) -> embedding.
        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        # Encoder. Module names carry the resolution; the forward pass dispatches on them.
        self.enc = torch.nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter, fused_resample=True)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

        # Decoder: two blocks at the bottom, then per level an upsampling block and num_blocks+1 blocks that each
        # consume one encoder skip.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, init_weight=1e-5)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (plain Python values): `SongUNet.from_config(net.config())` rebuilds the net."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._config.items()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SongUNet":
        """Build a net from `config()` output (or any subset of the constructor's keyword arguments)."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"config has unknown SongUNet arguments {unknown}; expected a subset of {sorted(known)}")
        return cls(**config)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None,
                augment_labels: Tensor | None = None) -> Tensor:
        # Mapping.
        emb = self.map_noise(noise_labels.to(x.dtype))
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError(f"class_labels [B, {self.label_dim}] is required: the net has label_dim="
                                 f"{self.label_dim}")
            tmp = class_labels.to(x.dtype)
            if self.training and self.label_dropout:
                tmp = tmp * (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(tmp.dtype)
            emb = emb + self.map_label(tmp * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(x.dtype))
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))

        # Encoder.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder; the output is the sum of the aux_conv heads (one head unless decoder_type='skip').
        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


def fashion_mnist_unet(label_dim: int = 10, model_channels: int = 32, channel_mult: Sequence[int] = (1, 1, 2),
                       num_blocks: int = 1, attn_resolutions: Sequence[int] = (7,), dropout: float = 0.1,
                       **kwargs: Any) -> SongUNet:
    """Small class-conditional DDPM++ for 28x28x1 (resolutions 28, 14, 7), cheap enough to train on a CPU.

    0.89M parameters; channels 32, 32, 64 per level, one block per level, attention at 7x7 (and in the decoder's
    first block, as in every SongUNet).

    Any other `SongUNet` argument can be passed through `kwargs`.
    """
    kwargs = dict(dict(img_resolution=28, in_channels=1, out_channels=1), **kwargs)
    return SongUNet(label_dim=label_dim, model_channels=model_channels, channel_mult=channel_mult,
                    num_blocks=num_blocks, attn_resolutions=attn_resolutions, dropout=dropout, **kwargs)
