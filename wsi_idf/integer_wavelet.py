"""Model v2, the exact coding model: ``wavelet_flow.WaveletIDF`` in integer arithmetic.

The lifting terms are computed in float64, exact for every integer below 2**53, so latents
never lose a bit however large the learned translations make them; the residual and prior
networks are ``integer_flow.IntNet`` (exact float32 by construction). The result is identical
on every device, thread count and batch size.
"""
from __future__ import annotations

import torch

from . import lifting
from .config import CHANNELS, PATCH, WaveletConfig
from .integer_flow import IntNet, SplitParams, exact_kernels, split_params


class IntegerWaveletIDF:
    """Forward (pixels -> latents) and inverse (latents -> pixels) of a v2 model, exactly."""

    def __init__(self, cfg: WaveletConfig, couplings: list[list[IntNet]], split_priors: list[IntNet],
                 device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.couplings = [[net.to(self.device) for net in level] for level in couplings]
        self.split_priors = [net.to(self.device) for net in split_priors]

    @property
    def levels(self) -> int:
        return self.cfg.levels

    @property
    def top_shape(self) -> tuple[int, int, int]:
        side = PATCH // 2**self.cfg.levels
        return (self.cfg.top_channels, side, side)

    def _lift(self, level: int, z: torch.Tensor, inverse: bool) -> torch.Tensor:
        """The level's four lifting couplings (or their inverse) on phase-major z (B, 12, h, w)."""
        phases = list(z.split(CHANNELS, dim=1))
        steps = range(len(lifting.LIFTING_STEPS))
        for step in (reversed(steps) if inverse else steps):
            src, tgt, axis, kind = lifting.LIFTING_STEPS[step]
            # exact: IntNet clamps its input to [-256, 255]
            learned = self.couplings[level][step](torch.cat([phases[k] for k in src], dim=1).float()).double()
            for i, (s, t) in enumerate(zip(src, tgt)):
                shift = lifting.fixed_term(phases[s], axis, kind) + learned[:, CHANNELS * i:CHANNELS * (i + 1)]
                phases[t] = phases[t] - shift if inverse else phases[t] + shift
        return torch.cat(phases, dim=1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[SplitParams], torch.Tensor]:
        """uint8 (B, 3, 80, 80) -> (factored-out high bands per level, their priors, top latents), integers."""
        with exact_kernels():
            z = lifting.rgb_to_ycocg(x.to(self.device, torch.float64))
            outs, priors = [], []
            for level in range(self.cfg.levels):
                z = self._lift(level, lifting.to_phases(z), inverse=False)
                if level < self.cfg.levels - 1:
                    low, high = z[:, :CHANNELS], z[:, CHANNELS:]
                    outs.append(high)
                    priors.append(split_params(self.split_priors[level], low.float()))
                    z = low
            return outs, priors, z

    @torch.no_grad()
    def split_params_for(self, level: int, low: torch.Tensor) -> SplitParams:
        with exact_kernels():
            return split_params(self.split_priors[level], low.to(self.device, torch.float32))

    @torch.no_grad()
    def decode_level(self, level: int, z: torch.Tensor) -> torch.Tensor:
        """All bands of ``level`` (low first, then the high bands) -> the level's input image."""
        with exact_kernels():
            return lifting.from_phases(self._lift(level, z.to(self.device, torch.float64), inverse=True))

    @staticmethod
    def to_pixels(z: torch.Tensor) -> torch.Tensor:
        return lifting.ycocg_to_rgb(z)
