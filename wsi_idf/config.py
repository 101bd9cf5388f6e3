"""Model configurations and the fixed constants of the integer coding path.

The constants here are part of the on-disk format: changing one changes what a
stored patch decodes to, so they only change together with ``patch_format.PATCH_FORMAT``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

PATCH = 80  # patch side in pixels; chunks are (3, PATCH, PATCH) uint8
CHANNELS = 3

# Activations of every coupling/prior network are ReLU6-like, quantized to 0..ACT_LEVELS.
ACT_MAX = 6.0
ACT_LEVELS = 127
# Network inputs: integer latents clamped to [IN_MIN, IN_MAX], scaled by 1/IN_DIV in the float model.
IN_MIN, IN_MAX, IN_DIV = -256, 255, 64.0
# Weights: int8 per output channel, on a power-of-two grid (rescaling is an exact shift).
WEIGHT_LEVELS = 127
# Translations are whole pixel steps clamped to +-T_MAX; latents then stay within +-2**15.
T_MAX = 1024
ESCAPE_BITS = 16
# Split priors: discretized logistic, mean on a 1/MEAN_STEPS grid, scale from NUM_SCALES log-spaced values.
MEAN_STEPS = 8  # a power of two: floor(mean / MEAN_STEPS) is exact in float32
NUM_SCALES = 64
SCALE_MIN, SCALE_MAX = 0.1, 64.0
LOG_SCALE_STEP = math.log(SCALE_MAX / SCALE_MIN) / (NUM_SCALES - 1)
SPLIT_WINDOW = 127  # symbols c-127..c+127 then one escape symbol
TOP_WINDOW = 255
TOP_MIXTURES = 5
# rANS probabilities are integers out of 2**PROB_BITS (constriction's default precision).
PROB_BITS = 24


@dataclass(frozen=True)
class IDFConfig:
    """Shape of an Integer Discrete Flow. Registered by name in ``wsi_idf.coding.registry``."""

    levels: int = 3
    steps: int = 4  # coupling steps per level
    width: int = 32  # hidden channels of each coupling / prior network
    blocks: int = 1  # residual blocks per network
    seed: int = 0  # seeds the fixed channel permutations

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def level_channels(self) -> list[int]:
        """Channels inside each level: 12 after the first squeeze, doubling after each factor-out+squeeze."""
        return [CHANNELS * 4 * 2**level for level in range(self.levels)]

    @property
    def top_channels(self) -> int:
        return self.level_channels()[-1]

    def check(self) -> None:
        side = PATCH
        for _ in range(self.levels):
            if side % 2:
                raise ValueError(f"{self.levels} levels do not divide a {PATCH}px patch")
            side //= 2
        if self.levels * self.steps * T_MAX + 256 >= 2 ** (ESCAPE_BITS - 1):
            raise ValueError("too many coupling steps: latents could leave the escape range")


@dataclass(frozen=True)
class WaveletConfig:
    """Shape of a wavelet-initialized IDF (model v2): YCoCg-R, then per level the four 5/3 lifting
    steps as additive couplings with learned residuals, and the three high bands factored out.

    The high bands' prior is a network on the low band; with ``context_width``, the half of the
    positions on the odd checkerboard squares is coded second and its prior also sees the even
    half (a two-pass spatial context). The last level keeps all four bands under the top prior.
    """

    levels: int = 3
    width: int = 32  # hidden channels of each coupling's residual network
    blocks: int = 1
    prior_width: int = 32  # hidden channels of each split prior's network
    prior_blocks: int = 1
    context_width: int = 32  # checkerboard context network of each split prior (0: none)

    kind = "wavelet"  # not a field: stored as the model file's flow kind

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @property
    def top_channels(self) -> int:
        return CHANNELS * 4

    def check(self) -> None:
        if self.levels < 1 or PATCH % 2**self.levels:
            raise ValueError(f"{self.levels} levels do not divide a {PATCH}px patch")
