"""The fixed integer transforms under model v2: YCoCg-R colour lifting and the 5/3 (LeGall) lifting steps.

Shared by the float training model (``wavelet_flow``) and the exact coding model
(``integer_wavelet``), which pass their own ``floor`` (straight-through in training).
Every term is a sum of integers divided by 2 or 4 and floored, so it is exact in float
arithmetic as long as values stay below 2**24 (float32) or 2**53 (float64).

A level works on the four polyphase components of each of the 3 channels, in phase-major
order (B, 12, h, w): phase 0 = (even row, even column), 1 = (even, odd), 2 = (odd, even),
3 = (odd, odd), each holding 3 colour channels.
"""
from __future__ import annotations

from collections.abc import Callable

from .runtime import torch

F = torch.nn.functional

from ..config import CHANNELS

Floor = Callable[[torch.Tensor], torch.Tensor]
# (source phases, target phases, axis, kind): target phase k is predicted/updated from source phase k
LIFTING_STEPS = (
    ((0, 2), (1, 3), -1, "predict"),  # horizontal predict: odd columns from the even ones
    ((1, 3), (0, 2), -1, "update"),  # horizontal update
    ((0, 1), (2, 3), -2, "predict"),  # vertical predict: odd rows from the even ones
    ((2, 3), (0, 1), -2, "update"),  # vertical update
)
_TO_PHASE_MAJOR = [c * 4 + p for p in range(4) for c in range(CHANNELS)]
_FROM_PHASE_MAJOR = [_TO_PHASE_MAJOR.index(i) for i in range(4 * CHANNELS)]


def rgb_to_ycocg(x: torch.Tensor, floor: Floor = torch.floor) -> torch.Tensor:
    """(B, 3, H, W) RGB integers 0..255 -> (Y - 128, Co, Cg), exactly invertible (YCoCg-R)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    co = r - b
    t = b + floor(co / 2)
    cg = g - t
    y = t + floor(cg / 2)
    return torch.cat([y - 128, co, cg], dim=1)


def ycocg_to_rgb(z: torch.Tensor) -> torch.Tensor:
    y, co, cg = z[:, 0:1] + 128, z[:, 1:2], z[:, 2:3]
    t = y - torch.floor(cg / 2)
    g = cg + t
    b = t - torch.floor(co / 2)
    return torch.cat([b + co, g, b], dim=1)


def to_phases(z: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 12, H/2, W/2), phase-major."""
    return F.pixel_unshuffle(z, 2)[:, _TO_PHASE_MAJOR]


def from_phases(z: torch.Tensor) -> torch.Tensor:
    return F.pixel_shuffle(z[:, _FROM_PHASE_MAJOR], 2)


def phase(z: torch.Tensor, k: int) -> torch.Tensor:
    return z[:, CHANNELS * k:CHANNELS * (k + 1)]


def _next(a: torch.Tensor, axis: int) -> torch.Tensor:
    """The neighbour after each position along ``axis``; the last one is replicated (symmetric extension)."""
    n = a.shape[axis]
    return torch.cat([a.narrow(axis, 1, n - 1), a.narrow(axis, n - 1, 1)], dim=axis)


def _prev(a: torch.Tensor, axis: int) -> torch.Tensor:
    n = a.shape[axis]
    return torch.cat([a.narrow(axis, 0, 1), a.narrow(axis, 0, n - 1)], dim=axis)


def fixed_term(source: torch.Tensor, axis: int, kind: str, floor: Floor = torch.floor) -> torch.Tensor:
    """What the 5/3 lifting step adds to its targets: -floor((a + b) / 2) or floor((a + b + 2) / 4)."""
    if kind == "predict":
        return -floor((source + _next(source, axis)) / 2)
    return floor((_prev(source, axis) + source + 2) / 4)


def split_step(z: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sources, targets) of lifting step ``step``, 6 channels each."""
    sources, targets, _, _ = LIFTING_STEPS[step]
    return (torch.cat([phase(z, k) for k in sources], dim=1), torch.cat([phase(z, k) for k in targets], dim=1))


def join_step(sources: torch.Tensor, targets: torch.Tensor, step: int) -> torch.Tensor:
    """Inverse of ``split_step``: the 12 phase-major channels."""
    src_phases, tgt_phases, _, _ = LIFTING_STEPS[step]
    parts: dict[int, torch.Tensor] = {}
    for i, k in enumerate(src_phases):
        parts[k] = sources[:, CHANNELS * i:CHANNELS * (i + 1)]
    for i, k in enumerate(tgt_phases):
        parts[k] = targets[:, CHANNELS * i:CHANNELS * (i + 1)]
    return torch.cat([parts[k] for k in range(4)], dim=1)


def step_fixed_term(sources: torch.Tensor, step: int, floor: Floor = torch.floor) -> torch.Tensor:
    _, _, axis, kind = LIFTING_STEPS[step]
    return fixed_term(sources, axis, kind, floor)


def anchor_mask(shape: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(h, w) bool: the even checkerboard squares, coded first (their prior sees only the low band)."""
    i, j = torch.meshgrid(torch.arange(shape[0], device=device), torch.arange(shape[1], device=device), indexing="ij")
    return (i + j) % 2 == 0
