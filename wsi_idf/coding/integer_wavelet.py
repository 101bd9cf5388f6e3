"""Model v2, the exact coding model: ``wavelet_flow.WaveletIDF`` in integer arithmetic.

The lifting terms are computed in float64, exact for every integer below 2**53, so latents
never lose a bit however large the learned translations make them; the residual and prior
networks are ``integer_flow.IntNet`` (exact float32 by construction). The result is identical
on every device, thread count and batch size.
"""
from __future__ import annotations

import functools

import numpy as np
from .runtime import torch

from . import lifting
from ..config import CHANNELS, WaveletConfig
from .integer_flow import ExactFlow, IntNet, SplitParams, exact_kernels, params_from_output
from .lifting import anchor_mask


class IntegerWaveletIDF(ExactFlow):
    """Forward (pixels -> latents) and inverse (latents -> pixels) of a v2 model, exactly."""

    def __init__(self, cfg: WaveletConfig, couplings: list[list[IntNet]], split_priors: list[IntNet],
                 context_priors: list[IntNet], device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.couplings = [[net.to(self.device) for net in level] for level in couplings]
        self.split_priors = [net.to(self.device) for net in split_priors]
        self.context_priors = [net.to(self.device) for net in context_priors]

    def _lift(self, level: int, z: torch.Tensor, inverse: bool, preview: bool = False) -> torch.Tensor:
        """The level's four lifting couplings (or their inverse) on phase-major z (B, 12, h, w).

        ``preview``: the high bands are stand-ins, not the coded values; the update steps' learned
        residuals, whose inputs are those bands, would turn them into colour casts, so they are left out.
        """
        phases = list(z.split(CHANNELS, dim=1))
        steps = range(len(lifting.LIFTING_STEPS))
        for step in (reversed(steps) if inverse else steps):
            src, tgt, axis, kind = lifting.LIFTING_STEPS[step]
            if preview and kind == "update":
                learned = torch.zeros_like(torch.cat([phases[k] for k in tgt], dim=1))
            else:  # exact: IntNet clamps its input to [-256, 255]
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
                    low, high = z[:, :CHANNELS].float(), z[:, CHANNELS:]
                    out = self._prior_output(level, low)
                    if self.context_priors:
                        first = anchor_mask(high.shape[-2:], self.device)
                        out = torch.where(first, out, self._prior_output(level, low, high.float(), out))
                    outs.append(high)
                    priors.append(params_from_output(out))
                    z = z[:, :CHANNELS]
            return outs, priors, z

    def _prior_output(self, level: int, low: torch.Tensor, high: torch.Tensor | None = None,
                      base: torch.Tensor | None = None) -> torch.Tensor:
        """The split prior's raw output (``base``, when already computed); given ``high``, the second
        checkerboard pass's, which also sees the first pass's latents (the rest of ``high`` is masked out)."""
        prior = self.split_priors[level]
        out = prior(low) if base is None else base
        if high is None:
            return out
        first = anchor_mask(high.shape[-2:], self.device)
        context = self.context_priors[level](torch.cat([low, high * first], dim=1))
        return torch.clamp(out + context, prior.conv_out.lo, prior.conv_out.hi)

    @torch.no_grad()
    def split_params_for(self, level: int, low: torch.Tensor, first: torch.Tensor | None = None,
                         previous: SplitParams | None = None) -> SplitParams:
        """Priors of the high bands of ``level``: of the first pass or, given its latents ``first``
        (B, 9, h, w; other positions ignored) and its ``previous`` priors, of the second."""
        with exact_kernels():
            low = low.to(self.device, torch.float32)
            high = None if first is None else first.to(self.device, torch.float32)
            return params_from_output(self._prior_output(level, low, high, previous and previous.output))

    def pass_masks(self, shape: tuple[int, ...]) -> list[np.ndarray]:
        """Which of the high-band latents (flattened (9, h, w)) each coding pass holds, in decoding order."""
        return _checkerboard_passes(tuple(shape)) if self.context_priors else [np.ones(int(np.prod(shape)), bool)]


    @torch.no_grad()
    def decode_level(self, level: int, z: torch.Tensor, exact: bool = True) -> torch.Tensor:
        """All bands of ``level`` (low first, then the high bands) -> the level's input image;
        ``exact=False`` when the high bands are a preview's stand-ins (``_lift``)."""
        with exact_kernels():
            return lifting.from_phases(self._lift(level, z.to(self.device, torch.float64), inverse=True,
                                                  preview=not exact))

    @staticmethod
    def to_pixels(z: torch.Tensor) -> torch.Tensor:
        return lifting.ycocg_to_rgb(z)


@functools.lru_cache(maxsize=16)
def _checkerboard_passes(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Built once per shape: the encoder asks for every patch and level."""
    first = np.broadcast_to(anchor_mask(shape[-2:]).numpy(), shape).ravel()
    return [first, ~first]
