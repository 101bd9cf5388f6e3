"""Model v2, the float training model: a flow that starts as the integer 5/3 wavelet in YCoCg-R.

Per level, the four 5/3 lifting steps are additive couplings whose translation is the fixed
dyadic term (``wsi_idf.coding.lifting``) plus the rounded output of a small residual network,
zero-initialized: at step 0 the flow IS the reversible wavelet transform of JPEG 2000, and
training only learns improvements over it (``../shared/notes/wavelet-flow.md``). The three
high bands of each level are factored out under a discretized logistic whose mean and scale
come from a network on the low band; the low band goes on to the next level. The last level
keeps all four bands under a per-channel logistic mixture.

The networks are ``flow.QuantNet``: trained in float first, then quantization-aware
(``flow.set_quantized``), so that ``model_export.export_model`` derives the exact integer model.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..coding import lifting
from ..coding.lifting import anchor_mask
from ..config import CHANNELS, LOG_SCALE_STEP, SCALE_MIN, T_MAX, WaveletConfig
from .flow import LN2, QuantNet, TopPrior, logistic_logp, round_ste, split_prior_units, split_scale

HIGH_CHANNELS = 3 * CHANNELS  # the HL, LH, HH bands of the 3 colour channels
STEP_CHANNELS = 2 * CHANNELS  # sources and targets of one lifting step


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """Floor, passing the gradient through unchanged."""
    return x + (torch.floor(x) - x).detach()


class WaveletIDF(TopPrior, nn.Module):
    def __init__(self, cfg: WaveletConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.couplings = nn.ModuleList(
            nn.ModuleList(QuantNet(STEP_CHANNELS, STEP_CHANNELS, cfg.width, cfg.blocks)
                          for _ in lifting.LIFTING_STEPS)
            for _ in range(cfg.levels))
        self.split_priors = nn.ModuleList(
            QuantNet(CHANNELS, 2 * HIGH_CHANNELS, cfg.prior_width, cfg.prior_blocks, split_prior_units(HIGH_CHANNELS))
            for _ in range(cfg.levels - 1))
        for prior in self.split_priors:
            with torch.no_grad():  # start the scales near 4 steps
                prior.conv_out.bias[HIGH_CHANNELS:] = math.log(4.0 / SCALE_MIN) / LOG_SCALE_STEP
        self.init_top_prior(cfg.top_channels)
        # registered last, so that adding them to a trained model leaves its optimizer state in place;
        # zero-initialized outputs: a model with context starts as the same model without it
        self.context_priors = nn.ModuleList(
            QuantNet(CHANNELS + HIGH_CHANNELS, 2 * HIGH_CHANNELS, cfg.context_width, cfg.prior_blocks,
                     split_prior_units(HIGH_CHANNELS))
            for _ in range(cfg.levels - 1 if cfg.context_width else 0))

    def lift(self, level: int, z: torch.Tensor) -> torch.Tensor:
        """The four lifting couplings of one level on phase-major z (B, 12, h, w)."""
        for step, net in enumerate(self.couplings[level]):
            sources, targets = lifting.split_step(z, step)
            fixed = lifting.step_fixed_term(sources, step, floor_ste)
            targets = targets + fixed + round_ste(net(sources).clamp(-T_MAX, T_MAX))
            z = lifting.join_step(sources, targets, step)
        return z

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Map uint8 patches (B, 3, 80, 80) to latents; return (NLL in bits per patch, latents per level)."""
        z = lifting.rgb_to_ycocg(x.float(), floor_ste)
        nll = torch.zeros(x.shape[0], device=x.device)
        latents = []
        for level in range(self.cfg.levels):
            z = self.lift(level, lifting.to_phases(z))
            if level < self.cfg.levels - 1:
                low, high = z[:, :CHANNELS], z[:, CHANNELS:]
                params = self.split_priors[level](low)
                if self.context_priors:  # the second checkerboard half also sees the first
                    first = anchor_mask(high.shape[-2:], high.device)
                    context = self.context_priors[level](torch.cat([low, high * first], dim=1))
                    params = torch.where(first, params, params + context)
                mean, u = params[:, :HIGH_CHANNELS], params[:, HIGH_CHANNELS:]
                nll = nll - logistic_logp(high, mean, split_scale(u)).flatten(1).sum(1)
                latents.append(high)
                z = low
        latents.append(z)
        nll = nll - self.top_logp(z).flatten(1).sum(1)
        return nll / LN2, latents

