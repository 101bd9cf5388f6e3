"""The exact integer coding model: the same flow as ``wsi_idf.flow`` in integer arithmetic.

Every quantity is an integer. Convolutions run in float32 on integer values whose every
partial sum is bounded below 2**24 by construction (max|input| * sum|w| per output
channel, splitting input channels into groups where needed), so any summation order
gives the same exact result; cuDNN (which may pick Winograd/FFT) is switched off.
Rescaling is ``(acc * M + B) >> REQUANT_SHIFT`` in int64. The result is identical on
every device, thread count and batch size.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import ACT_LEVELS, IN_MAX, IN_MIN, MEAN_SHIFT, MEAN_STEPS, REQUANT_SHIFT, IDFConfig

EXACT_FLOAT32 = 2**24


@dataclass
class IntConv:
    """One integer convolution layer: weights (int), per-channel multiplier, offset and output clamp."""

    weight: torch.Tensor  # float32 holding int8 values, (cout, cin, k, k)
    mult: torch.Tensor  # int64 (cout,)
    offset: torch.Tensor  # int64 (cout,)
    lo: torch.Tensor | None  # int64 (cout,) clamp bounds of an output layer, None for hidden layers
    hi: torch.Tensor | None
    input_groups: list[slice]  # input channel groups that keep partial sums exact

    @classmethod
    def build(cls, weight: np.ndarray, mult: np.ndarray, offset: np.ndarray, max_input: int,
              lo: np.ndarray | None = None, hi: np.ndarray | None = None) -> "IntConv":
        weight = np.asarray(weight, dtype=np.int64)
        cin = weight.shape[1]
        per_channel = np.abs(weight).sum(axis=(2, 3))  # (cout, cin)
        groups, start = [], 0
        while start < cin:  # greedy: widest input group whose bound stays exact
            stop = start + 1
            while stop < cin and per_channel[:, start:stop + 1].sum(1).max() * max_input < EXACT_FLOAT32:
                stop += 1
            if per_channel[:, start:stop].sum(1).max() * max_input >= EXACT_FLOAT32:
                raise ValueError("a single input channel exceeds the exact float32 range")
            groups.append(slice(start, stop))
            start = stop
        bound = per_channel.sum(1).max() * max_input
        if bound * int(np.abs(mult).max(initial=0)) + int(np.abs(offset).max(initial=0)) >= 2**62:
            raise ValueError("requantization could overflow int64")
        as_t = lambda a: None if a is None else torch.as_tensor(np.asarray(a, np.int64))
        return cls(torch.as_tensor(weight, dtype=torch.float32), as_t(mult), as_t(offset), as_t(lo), as_t(hi), groups)

    def to(self, device: torch.device) -> "IntConv":
        move = lambda t: None if t is None else t.to(device)
        return IntConv(move(self.weight), move(self.mult), move(self.offset), move(self.lo), move(self.hi),
                       self.input_groups)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: int64 (B, cin, H, W) -> requantized int64 (B, cout, H, W), unclamped for hidden layers."""
        pad = self.weight.shape[-1] // 2
        acc = None
        for group in self.input_groups:
            part = F.conv2d(x[:, group].to(torch.float32), self.weight[:, group], padding=pad).to(torch.int64)
            acc = part if acc is None else acc + part
        y = (acc * self.mult.view(1, -1, 1, 1) + self.offset.view(1, -1, 1, 1)) >> REQUANT_SHIFT
        if self.lo is not None:
            y = torch.maximum(torch.minimum(y, self.hi.view(1, -1, 1, 1)), self.lo.view(1, -1, 1, 1))
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
        h = self.conv_in(z.clamp(IN_MIN, IN_MAX)).clamp(0, ACT_LEVELS)
        for conv_a, conv_b in self.blocks:
            h = (h + conv_b(conv_a(h).clamp(0, ACT_LEVELS))).clamp(0, ACT_LEVELS)
        return self.conv_out(h)


@contextlib.contextmanager
def exact_kernels():
    """Keep convolutions on kernels that sum exactly: no cuDNN (Winograd/FFT), no TF32."""
    with torch.backends.cudnn.flags(enabled=False, allow_tf32=False):
        yield


@dataclass
class SplitParams:
    """Prior of the factored-out latents of one level: table row index and window centre per latent."""

    rows: torch.Tensor  # int64, scale_index * MEAN_STEPS + mean_fraction
    centres: torch.Tensor  # int64, floor(mean)


class IntegerIDF:
    """Forward (pixels -> latents) and inverse (latents -> pixels) in exact integer arithmetic."""

    def __init__(self, cfg: IDFConfig, perms: list[list[np.ndarray]], couplings: list[list[IntNet]],
                 split_priors: list[IntNet], device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.perms = [[torch.as_tensor(p, dtype=torch.long, device=self.device) for p in level] for level in perms]
        self.inverse_perms = [[torch.argsort(p) for p in level] for level in self.perms]
        self.couplings = [[net.to(self.device) for net in level] for level in couplings]
        self.split_priors = [net.to(self.device) for net in split_priors]

    def to(self, device: torch.device | str) -> "IntegerIDF":
        perms = [[p.cpu().numpy() for p in level] for level in self.perms]
        return IntegerIDF(self.cfg, perms, self.couplings, self.split_priors, device)

    def split_params(self, level: int, keep: torch.Tensor) -> SplitParams:
        out = self.split_priors[level](keep)
        half = out.shape[1] // 2
        mean_q, scale_index = out[:, :half], out[:, half:]
        return SplitParams(scale_index * MEAN_STEPS + (mean_q & (MEAN_STEPS - 1)), mean_q >> MEAN_SHIFT)

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
        """uint8 (B, 3, 80, 80) -> (factored-out latents per level, their priors, top latents)."""
        with exact_kernels():
            z = F.pixel_unshuffle(x.to(self.device, torch.int64) - 128, 2)
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
            return self._couple(level, z.to(self.device, torch.int64), inverse=True)

    @torch.no_grad()
    def split_params_for(self, level: int, keep: torch.Tensor) -> SplitParams:
        with exact_kernels():
            return self.split_params(level, keep)
