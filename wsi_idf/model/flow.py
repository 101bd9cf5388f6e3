"""The float Integer Discrete Flow used for training (quantization-aware).

Every network already sees what the integer coding model will compute: int8 weights
(per output channel), activations clamped to [0, ACT_MAX] and quantized to
ACT_LEVELS steps, integer translations. Gradients pass the roundings straight
through. ``wsi_idf.model.export.export_model`` turns a trained model into the exact integer model.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import (ACT_LEVELS, ACT_MAX, CHANNELS, IN_DIV, IN_MAX, IN_MIN, LOG_SCALE_STEP, MEAN_STEPS, NUM_SCALES,
                     PATCH, SCALE_MIN, T_MAX, TOP_MIXTURES, WEIGHT_LEVELS, IDFConfig)

LN2 = math.log(2.0)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to integers, passing the gradient through unchanged."""
    return x + (torch.round(x) - x).detach()


class _QuantAct(torch.autograd.Function):
    """Clamp to [0, ACT_MAX] and round to the activation grid; the gradient passes where the clamp does.

    One fused function instead of clamp, divide, round, multiply, subtract and add with a detach:
    the activations are the largest tensors in training, and this halves the passes over them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward((x >= 0.0) & (x <= ACT_MAX))
        return _on_grid(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (inside,) = ctx.saved_tensors
        return grad * inside


def _on_grid(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, ACT_MAX).div_(ACT_MAX / ACT_LEVELS).round_().mul_(ACT_MAX / ACT_LEVELS)


def quant_act(x: torch.Tensor) -> torch.Tensor:
    # evaluation (no gradient wanted) skips the mask the backward pass would need
    return _QuantAct.apply(x) if torch.is_grad_enabled() and x.requires_grad else _on_grid(x)


def quant_input(z: torch.Tensor) -> torch.Tensor:
    return z.clamp(IN_MIN, IN_MAX) / IN_DIV


ACT_SCALE = ACT_MAX / ACT_LEVELS
BIAS_BITS = 22  # integer biases stay below 2**22: exact in float32 with room for the sum
INPUT_SCALE = 1.0 / IN_DIV


class QuantConv(nn.Conv2d):
    """Conv2d with int8 weights on a power-of-two grid per output channel.

    The grid is chosen so that ``weight_scale * in_scale / out_scale`` is a power of two:
    the integer model then rescales with an exact shift instead of a multiplication.
    """

    def __init__(self, cin: int, cout: int, kernel: int, in_scale: float, out_scale: torch.Tensor | float):
        super().__init__(cin, cout, kernel, padding=kernel // 2)
        self.in_scale = in_scale
        self.register_buffer("out_scale", torch.as_tensor(out_scale, dtype=torch.float32).expand(cout).clone(),
                             persistent=False)

    def weight_exponent(self) -> torch.Tensor:
        """e per output channel: weight_scale = 2**e * out_scale / in_scale.

        The finest grid that holds the largest weight in int8, but never so fine that the
        integer bias, (bias / out_scale + 1/2) * 2**-e, reaches 2**BIAS_BITS.
        """
        ratio = self.out_scale / self.in_scale
        peak = self.weight.detach().abs().amax(dim=(1, 2, 3)).clamp_min(1e-30)
        fit_weights = torch.ceil(torch.log2(peak / (WEIGHT_LEVELS * ratio)))
        bias = (self.bias.detach().abs() / self.out_scale + 1.0) if self.bias is not None else torch.ones_like(peak)
        fit_bias = torch.ceil(torch.log2(bias)) - BIAS_BITS
        return torch.maximum(fit_weights, fit_bias)

    def weight_scale(self) -> torch.Tensor:
        return torch.exp2(self.weight_exponent()) * self.out_scale / self.in_scale

    def integer_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The int8 weight values (as ``dtype``): what the integer model stores and training simulates."""
        s = self.weight_scale().to(dtype).view(-1, 1, 1, 1)
        return torch.clamp(torch.round(self.weight.detach().to(dtype) / s), -WEIGHT_LEVELS, WEIGHT_LEVELS)

    quantize = True  # False during float warm-up training: plain float weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize:
            return F.conv2d(x, self.weight, self.bias, padding=self.padding)
        q = self.integer_weight() * self.weight_scale().view(-1, 1, 1, 1)
        return F.conv2d(x, self.weight + (q - self.weight).detach(), self.bias, padding=self.padding)


class QuantNet(nn.Module):
    """conv3x3 -> [conv3x3, conv1x1 + residual] x blocks -> conv3x3 (zero-initialized output).

    ``out_units`` gives, per output channel, how many integer steps make one unit of the
    output (1 for translations in pixels, MEAN_STEPS for prior means).
    """

    def __init__(self, cin: int, cout: int, width: int, blocks: int, out_units: torch.Tensor | float = 1.0):
        super().__init__()
        self.conv_in = QuantConv(cin, width, 3, INPUT_SCALE, ACT_SCALE)
        self.blocks = nn.ModuleList(
            nn.ModuleList([QuantConv(width, width, 3, ACT_SCALE, ACT_SCALE), QuantConv(width, width, 1, ACT_SCALE,
                                                                                        ACT_SCALE)])
            for _ in range(blocks))
        self.conv_out = QuantConv(width, cout, 3, ACT_SCALE, 1.0 / torch.as_tensor(out_units, dtype=torch.float32))
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    quantize = True  # False during float warm-up training: activations clamped, not rounded

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        act = quant_act if self.quantize else (lambda h: h.clamp(0.0, ACT_MAX))
        h = act(self.conv_in(quant_input(z)))
        for conv_a, conv_b in self.blocks:
            h = act(h + conv_b(act(conv_a(h))))
        return self.conv_out(h)


def set_quantized(model: nn.Module, quantize: bool) -> None:
    """Switch every quantization-aware network of ``model`` between float and QAT behaviour.

    Float warm-up learns faster per step; QAT fine-tuning then closes the gap to the integer model.
    """
    for module in model.modules():
        if isinstance(module, (QuantConv, QuantNet)):
            module.quantize = quantize


def logistic_logp(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) of a discretized logistic on the integers (natural log), numerically stable."""
    inv_s = torch.exp(-log_scale)
    upper = (x + 0.5 - mean) * inv_s
    lower = (x - 0.5 - mean) * inv_s
    # sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * (1 - exp(b - a))
    return F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log((-torch.expm1(-inv_s)).clamp_min(1e-30))


def split_scale(u: torch.Tensor) -> torch.Tensor:
    """Log-scale of a split prior from its raw output u (in units of scale-table steps)."""
    return math.log(SCALE_MIN) + u.clamp(0, NUM_SCALES - 1) * LOG_SCALE_STEP


def split_prior_units(channels: int) -> torch.Tensor:
    """Output units of a split-prior network: means on a 1/MEAN_STEPS grid, then scale indices."""
    return torch.cat([torch.full((channels,), float(MEAN_STEPS)), torch.ones(channels)])


def permutations(cfg: IDFConfig) -> list[list[np.ndarray]]:
    """The fixed random channel permutations, one per coupling step (stored with the weights)."""
    rng = np.random.default_rng(cfg.seed)
    return [[rng.permutation(c) for _ in range(cfg.steps)] for c in cfg.level_channels()]


class TopPrior:
    """The per-channel logistic mixture over the last level's latents, shared by the v1 and v2 flows
    (its parameters live on the model itself: ``top_mean``, ``top_log_scale``, ``top_logits``)."""

    def init_top_prior(self, channels: int) -> None:
        self.top_mean = nn.Parameter(torch.linspace(-20, 20, TOP_MIXTURES).repeat(channels, 1))
        self.top_log_scale = nn.Parameter(torch.full((channels, TOP_MIXTURES), math.log(16.0)))
        self.top_logits = nn.Parameter(torch.zeros(channels, TOP_MIXTURES))

    def top_logp(self, z: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, TOP_MIXTURES)
        logp = logistic_logp(z.unsqueeze(-1), self.top_mean.view(shape), self.top_log_scale.view(shape))
        weights = torch.log_softmax(self.top_logits, dim=-1).view(shape)
        return torch.logsumexp(logp + weights, dim=-1)

    @staticmethod
    def bits_per_subpixel(nll_bits: torch.Tensor) -> torch.Tensor:
        return nll_bits / (CHANNELS * PATCH * PATCH)


class IDF(TopPrior, nn.Module):
    """Squeeze; per level ``steps`` x (permutation, additive coupling); factor-out with a split prior;
    a per-channel discretized logistic mixture at the top."""

    def __init__(self, cfg: IDFConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        chans = cfg.level_channels()
        for level, level_perms in enumerate(permutations(cfg)):
            for step, perm in enumerate(level_perms):
                self.register_buffer(f"perm_{level}_{step}", torch.as_tensor(perm, dtype=torch.long))
        self.couplings = nn.ModuleList(
            nn.ModuleList(QuantNet(c // 2, c - c // 2, cfg.width, cfg.blocks) for _ in range(cfg.steps))
            for c in chans)
        self.split_priors = nn.ModuleList(
            QuantNet(c // 2, 2 * (c - c // 2), cfg.width, cfg.blocks, split_prior_units(c - c // 2))
            for c in chans[:-1])
        for prior, c in zip(self.split_priors, chans):
            with torch.no_grad():  # start the scales near 4 pixel steps
                prior.conv_out.bias[c - c // 2:] = math.log(4.0 / SCALE_MIN) / LOG_SCALE_STEP
        self.init_top_prior(chans[-1])

    def perm(self, level: int, step: int) -> torch.Tensor:
        return getattr(self, f"perm_{level}_{step}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Map uint8 patches (B, 3, 80, 80) to latents; return (NLL in bits per patch, latents per level)."""
        z = F.pixel_unshuffle(x.float() - 128.0, 2)
        nll = torch.zeros(x.shape[0], device=x.device)
        latents = []
        for level in range(self.cfg.levels):
            for step, net in enumerate(self.couplings[level]):
                z = z[:, self.perm(level, step)]
                half = z.shape[1] // 2
                z1, z2 = z[:, :half], z[:, half:]
                z = torch.cat([z1, z2 + round_ste(net(z1).clamp(-T_MAX, T_MAX))], dim=1)
            if level < self.cfg.levels - 1:
                half = z.shape[1] // 2
                keep, out = z[:, :half], z[:, half:]
                params = self.split_priors[level](keep)
                mean, u = params[:, :out.shape[1]], params[:, out.shape[1]:]
                nll = nll - logistic_logp(out, mean, split_scale(u)).flatten(1).sum(1)
                latents.append(out)
                z = F.pixel_unshuffle(keep, 2)
        latents.append(z)
        nll = nll - self.top_logp(z).flatten(1).sum(1)
        return nll / LN2, latents

