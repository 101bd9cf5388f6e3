"""The exact integer coding model: the same flow as ``wsi_idf.model.flow`` in integer arithmetic.

Every quantity is an integer, carried in float32 only where every value and every partial
sum is an integer below 2**24 in magnitude (bounded per layer by max|input| * sum|w| + |bias|),
so any summation order gives the same exact result. Rescaling is by powers of two
(``floor((acc + bias) * 2**-shift)``), which float32 also does exactly, so it is folded into
the weights and bias: one convolution and a floor per layer. A layer whose bound
is larger sums input-channel groups in float64. cuDNN (which may pick Winograd/FFT) and
TF32 are switched off. The result is identical on every device, thread count and batch size.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
from .runtime import torch

F = torch.nn.functional

from ..config import ACT_LEVELS, IN_MAX, IN_MIN, MEAN_STEPS, PATCH, IDFConfig

EXACT_FLOAT32 = 2**24


@dataclass
class IntConv:
    """One integer convolution: y = floor((conv(x, w) + bias) * 2**-shift), clamped for output layers
    (the rescaling folded into weights and bias: exact, see ``build``)."""

    weight: torch.Tensor  # float32: int8 values times their output channel's 2**-shift, (cout, cin, k, k)
    bias: torch.Tensor  # float32: integers times 2**-shift, (cout,)
    lo: torch.Tensor | None  # clamp bounds (1, cout, 1, 1) of an output layer, None for hidden layers
    hi: torch.Tensor | None
    input_groups: list[slice] | None  # None: one exact float32 conv; else groups summed in float64

    @classmethod
    def build(cls, weight: np.ndarray, bias: np.ndarray, shift: np.ndarray, max_input: int,
              lo: np.ndarray | None = None, hi: np.ndarray | None = None) -> "IntConv":
        weight = np.asarray(weight, dtype=np.int64)
        bias = np.asarray(bias, dtype=np.int64)
        shift = np.asarray(shift, dtype=np.int64)
        if np.abs(bias).max(initial=0) >= EXACT_FLOAT32 or np.abs(shift).max(initial=0) > 100:
            raise ValueError("integer layer parameters out of range")
        per_channel = np.abs(weight).sum(axis=(2, 3))  # (cout, cin)
        groups = None
        if (per_channel.sum(1) * max_input + np.abs(bias)).max() >= EXACT_FLOAT32:
            groups, start = [], 0
            while start < weight.shape[1]:  # widest input groups whose partial sums stay exact
                stop = start + 1
                while stop < weight.shape[1] and per_channel[:, start:stop + 1].sum(1).max() * max_input < EXACT_FLOAT32:
                    stop += 1
                if per_channel[:, start:stop].sum(1).max() * max_input >= EXACT_FLOAT32:
                    raise ValueError("a single input channel exceeds the exact float32 range")
                groups.append(slice(start, stop))
                start = stop
        column = lambda a: None if a is None else torch.as_tensor(np.asarray(a, np.float32)).view(1, -1, 1, 1)
        # scaling by a power of two is exact in float: conv(x, w * 2**-s) + b * 2**-s is
        # (conv(x, w) + b) * 2**-s exactly, every partial sum included, so the convolution rescales
        factor = np.ldexp(1.0, -shift)
        return cls(torch.as_tensor(weight * factor[:, None, None, None], dtype=torch.float32),
                   torch.as_tensor(bias * factor, dtype=torch.float32), column(lo), column(hi), groups)

    def to(self, device: torch.device) -> "IntConv":
        move = lambda t: None if t is None else t.to(device)
        return IntConv(move(self.weight), move(self.bias), move(self.lo), move(self.hi), self.input_groups)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: float32 integers (B, cin, H, W) -> float32 integers (B, cout, H, W)."""
        pad = self.weight.shape[-1] // 2
        if self.input_groups is None:
            y = F.conv2d(x, self.weight, self.bias, padding=pad).floor_()
        else:
            acc = sum(F.conv2d(x[:, g], self.weight[:, g], padding=pad).double() for g in self.input_groups)
            y = acc.add_(self.bias.double().view(1, -1, 1, 1)).floor_().float()
        if self.lo is not None:
            y = torch.clamp(y, self.lo, self.hi)
        return y


class IntNet:
    """Integer twin of ``flow.QuantNet``."""

    def __init__(self, layers: list[IntConv]):
        self.conv_in, *middle, self.conv_out = layers
        self.blocks = list(zip(middle[0::2], middle[1::2]))

    def to(self, device: torch.device) -> "IntNet":
        return IntNet([layer.to(device) for layer in self.layers()])

    def layers(self) -> list[IntConv]:
        return [self.conv_in, *[layer for block in self.blocks for layer in block], self.conv_out]

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        # channels-last runs these small convolutions ~1.5x faster on CPU; exact in any layout
        z = z.clamp(IN_MIN, IN_MAX).contiguous(memory_format=torch.channels_last)
        h = self.conv_in(z).clamp_(0, ACT_LEVELS)
        for conv_a, conv_b in self.blocks:
            h = conv_b(conv_a(h).clamp_(0, ACT_LEVELS)).add_(h).clamp_(0, ACT_LEVELS)
        return self.conv_out(h)


@contextlib.contextmanager
def exact_kernels():
    """Keep convolutions on kernels that sum exactly: no cuDNN (Winograd/FFT), no TF32."""
    with torch.backends.cudnn.flags(enabled=False, allow_tf32=False):
        yield


@dataclass
class SplitParams:
    """Prior of the factored-out latents of one level: table row index and window centre per latent."""

    rows: torch.Tensor  # integers, scale_index * MEAN_STEPS + mean_fraction
    centres: torch.Tensor  # integers, floor(mean)
    output: torch.Tensor | None = None  # the prior network's raw output, reused by a later coding pass


def split_params(prior: IntNet, keep: torch.Tensor) -> SplitParams:
    """The split prior's table rows and window centres for the latents factored out beside ``keep``."""
    return params_from_output(prior(keep))


def params_from_output(out: torch.Tensor) -> SplitParams:
    """Table rows and window centres from a prior network's output (means in 1/MEAN_STEPS, scale indices)."""
    half = out.shape[1] // 2
    mean_q, scale_index = out[:, :half], out[:, half:]
    centres = torch.floor(mean_q / MEAN_STEPS)  # exact: division by a power of two
    return SplitParams(scale_index * MEAN_STEPS + (mean_q - centres * MEAN_STEPS), centres, out)


class ExactFlow:
    """What the coder asks of an exact coding flow besides its transforms: levels and the top's shape."""

    cfg: IDFConfig

    @property
    def levels(self) -> int:
        return self.cfg.levels

    @property
    def top_shape(self) -> tuple[int, int, int]:
        side = PATCH // 2**self.cfg.levels
        return (self.cfg.top_channels, side, side)


class IntegerIDF(ExactFlow):
    """Forward (pixels -> latents) and inverse (latents -> pixels) in exact integer arithmetic."""

    def __init__(self, cfg: IDFConfig, perms: list[list[np.ndarray]], couplings: list[list[IntNet]],
                 split_priors: list[IntNet], device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.perms = [[torch.as_tensor(p, dtype=torch.long, device=self.device) for p in level] for level in perms]
        self.inverse_perms = [[torch.argsort(p) for p in level] for level in self.perms]
        self.couplings = [[net.to(self.device) for net in level] for level in couplings]
        self.split_priors = [net.to(self.device) for net in split_priors]

    def split_params(self, level: int, keep: torch.Tensor) -> SplitParams:
        return split_params(self.split_priors[level], keep)

    def _couple(self, level: int, z: torch.Tensor, inverse: bool) -> torch.Tensor:
        steps = range(self.cfg.steps)
        for step in (reversed(steps) if inverse else steps):
            net = self.couplings[level][step]
            if not inverse:
                z = z[:, self.perms[level][step]]
            half = z.shape[1] // 2
            z1, z2 = z[:, :half], z[:, half:]
            t = net(z1)
            z = torch.cat([z1, z2 - t if inverse else z2 + t], dim=1)
            if inverse:
                z = z[:, self.inverse_perms[level][step]]
        return z

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[SplitParams], torch.Tensor]:
        """uint8 (B, 3, 80, 80) -> (factored-out latents per level, their priors, top latents), all integers."""
        with exact_kernels():
            z = F.pixel_unshuffle(x.to(self.device, torch.float32) - 128, 2)
            outs, priors = [], []
            for level in range(self.cfg.levels):
                z = self._couple(level, z, inverse=False)
                if level < self.cfg.levels - 1:
                    half = z.shape[1] // 2
                    keep, out = z[:, :half], z[:, half:]
                    outs.append(out)
                    priors.append(self.split_params(level, keep))
                    z = F.pixel_unshuffle(keep, 2)
            return outs, priors, z

    @torch.no_grad()
    def inverse_level(self, level: int, z: torch.Tensor) -> torch.Tensor:
        """Undo the couplings of one level (z holds all its channels)."""
        with exact_kernels():
            return self._couple(level, z.to(self.device, torch.float32), inverse=True)

    @torch.no_grad()
    def split_params_for(self, level: int, keep: torch.Tensor, first: torch.Tensor | None = None,
                         previous: SplitParams | None = None) -> SplitParams:
        """Priors of the latents factored out at ``level``; v1 codes them in one pass (``first`` unused)."""
        with exact_kernels():
            return self.split_params(level, keep)

    @staticmethod
    def pass_masks(shape: tuple[int, ...]) -> list[np.ndarray]:
        """Which of the factored-out latents (flattened ``shape``) each coding pass holds: v1 has one pass."""
        return [np.ones(int(np.prod(shape)), dtype=bool)]

    def decode_level(self, level: int, z: torch.Tensor, exact: bool = True) -> torch.Tensor:
        """All latents of ``level`` (kept channels first) -> the level's input image (``exact`` unused:
        v1 previews invert the flow as it is)."""
        return F.pixel_shuffle(self.inverse_level(level, z), 2)

    @staticmethod
    def to_pixels(z: torch.Tensor) -> torch.Tensor:
        return z + 128
