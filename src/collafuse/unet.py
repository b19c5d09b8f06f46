"""A small U-Net noise predictor ``eps_theta(x_t, t [, y])`` for both sides of the cut.

The site and the server use the same architecture at different widths (:class:`UNetSpec`);
the default site model is several times smaller than the server's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class UNetSpec:
    """Architecture of a U-Net; the constructor signature is the config.

    Attributes:
        base_channels: channels at full resolution.
        channel_mults: channel multiplier per resolution level; each level after the first
            halves the resolution (28 -> 14 -> 7 for Fashion-MNIST).
        num_res_blocks: residual blocks per level.
        attention: self-attention in the middle block (the lowest resolution).
        attention_levels: levels (0 = full resolution) whose residual blocks are each followed
            by self-attention, on the way down and up (e.g. the 16x16 and 8x8 levels of a 64x64
            model are 2 and 3; :mod:`collafuse.presets`).
    """

    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention: bool = False
    attention_levels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.base_channels < 4 or self.base_channels % 4:
            raise ValueError(
                f"base_channels must be a multiple of 4 >= 4, got {self.base_channels}"
            )
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            raise ValueError(f"channel_mults must be positive, got {self.channel_mults}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        bad = [lv for lv in self.attention_levels if not 0 <= lv < len(self.channel_mults)]
        if bad:
            raise ValueError(
                f"attention_levels {bad} outside the {len(self.channel_mults)} levels "
                f"0..{len(self.channel_mults) - 1}"
            )

    @property
    def downsampling(self) -> int:
        """Total downsampling factor: image sides must be divisible by it."""
        return int(2 ** (len(self.channel_mults) - 1))

    def to_dict(self) -> dict[str, object]:
        return {
            **asdict(self),
            "channel_mults": list(self.channel_mults),
            "attention_levels": list(self.attention_levels),
        }


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps ``t [N]`` -> ``[N, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels // 4), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time/condition embedding added in between."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int) -> None:
        super().__init__()
        self.block1 = nn.Sequential(_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        self.block2 = nn.Sequential(_norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.block1(x) + self.emb(emb)[:, :, None, None]
        return self.block2(h) + self.skip(x)


class Attention(nn.Module):
    """Single-head self-attention over spatial positions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).unbind(1)  # each [N, C, HW]
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return x + self.out(a.transpose(1, 2).reshape(n, c, h, w))


class UNet(nn.Module):
    """``forward(x [N, C, H, W], t [N] long, y [N] long | None) -> eps [N, C, H, W]``.

    ``num_classes`` > 0 adds a learned embedding of ``y`` (a class label at a site, the
    site id at the server) to the time embedding.
    """

    def __init__(self, spec: UNetSpec, in_channels: int = 1, num_classes: int = 0) -> None:
        super().__init__()
        self.spec, self.num_classes = spec, num_classes
        ch = spec.base_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(
            nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.label_emb = nn.Embedding(num_classes, emb_dim) if num_classes > 0 else None
        self.stem = nn.Conv2d(in_channels, ch, 3, padding=1)

        widths = [ch * m for m in spec.channel_mults]
        self.down, self.down_attn = nn.ModuleList(), nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_widths, c = [ch], ch
        for level, w in enumerate(widths):
            for _ in range(spec.num_res_blocks):
                self.down.append(ResBlock(c, w, emb_dim))
                self.down_attn.append(self._attention(level, w))
                c = w
                skip_widths.append(c)
            last = level == len(widths) - 1
            self.downsample.append(
                nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1)
            )
            if not last:
                skip_widths.append(c)
        self.mid1 = ResBlock(c, c, emb_dim)
        self.mid_attn = Attention(c) if spec.attention else nn.Identity()
        self.mid2 = ResBlock(c, c, emb_dim)

        self.up, self.up_attn = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(widths))):
            w = widths[level]
            for _ in range(spec.num_res_blocks + 1):  # one extra block eats the level's input skip
                self.up.append(ResBlock(c + skip_widths.pop(), w, emb_dim))
                self.up_attn.append(self._attention(level, w))
                c = w
        self.head = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, in_channels, 3, padding=1))
        self._levels = len(widths)

    def _attention(self, level: int, channels: int) -> nn.Module:
        """Self-attention after a block at ``level`` if the spec asks for it (Identity holds no
        weights, so specs without attention keep their checkpoints' keys)."""
        return Attention(channels) if level in self.spec.attention_levels else nn.Identity()

    def _embed(self, t: Tensor, y: Tensor | None) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.spec.base_channels))
        if self.label_emb is not None:
            if y is None:
                raise ValueError("this model is conditional: pass y")
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self._embed(t, y)
        h = self.stem(x)
        skips = [h]
        blocks = iter(zip(self.down, self.down_attn, strict=True))
        for level in range(self._levels):
            for _ in range(self.spec.num_res_blocks):
                block, attn = next(blocks)
                h = attn(block(h, emb))
                skips.append(h)
            if level < self._levels - 1:
                h = self.downsample[level](h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        ups = iter(zip(self.up, self.up_attn, strict=True))
        for level in reversed(range(self._levels)):
            for _ in range(self.spec.num_res_blocks + 1):
                block, attn = next(ups)
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            if level > 0:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
        return self.head(h)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
