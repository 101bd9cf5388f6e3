"""Per-slide adaptation: fine-tune the base model on the slide being archived, keep it only if it wins.

Regions are read across the slide's IDF-coded levels (weighted by area, mostly tissue); whole
regions are held out, so the held-out patches share no pixels with training. The base model is
fine-tuned quantization-aware for a wall-time budget (or a fixed number of steps, which is
reproducible exactly given the seed), the best EMA on the held-out patches is exported, its
exact round trip is proved on them, and the bytes ``encode_patches`` really writes decide: the
adapted model is kept only when it writes fewer bytes than the base on the held-out patches.

Why this works: the shipped model loses on unseen slides mostly to domain shift (stain, scanner,
JPEG history); 3 CPU-minutes of adaptation gained 1-6% on unseen material (``../shared/notes``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import PATCH
from ..errors import WsiIdfError

log = logging.getLogger("wsi_idf")

REGION = 400  # side of the regions read from the slide (25 patches each)
TRAIN_REGIONS, HELDOUT_REGIONS = 48, 12
# measured, 2.5 minutes on 2 cores, held-out bits saved on the TCGA / CMU slides: lr 3e-3 5.61% / 2.32%,
# 6e-3 5.98% / 2.57%, 1e-2 5.97% / 2.88%; batch 32 at 3e-3 5.54% / 2.08% (fewer steps). The best EMA on
# the held-out regions is what is kept, and the base model whenever that loses, so a high rate is safe.
ADAPT_LR = 1e-2
ADAPT_BATCH = 16
EVAL_EVERY = 50  # 50: 559 steps and 6.66% saved on CMU in 2.5 min; 25: 502 steps, 6.39% (evaluation is ~2 s)
# Regions sit on the 80-px grid the level is coded on and training crops on its 8-px subgrid, unflipped:
# the model learns the phase it codes (the 5/3 lifting's even/odd samples, JPEG's 8x8 blocks, the
# scanner's orientation). Measured, 2.5 minutes, held-out bits saved on CMU / TCGA (each setting on its
# own held-out regions): random corners, flips and rotations (as the base model trains) 3.1% / 6.4%; on
# the grid, unflipped 5.8% / 13.8%; cosine decay of the rate over the budget 4.6% / 12.7%; a float first
# 60% then QAT 5.2% / 12.5%. On a loaded machine (~50 steps): unflipped 2.2% / 7.6%, with flips 0.8% /
# 5.8%, lr 2e-2 -4.4% / 4.0%. Whole slides (make bench-adapt): 0.952x / 0.914x JPEG XL e9 became 0.924x / 0.885x.
CROP_GRID = 8


@dataclass(frozen=True)
class AdaptSettings:
    """``minutes`` of wall time on ``device``, or exactly ``steps`` steps (reproducible given ``seed``)."""
    minutes: float | None = 3.0
    steps: int | None = None
    seed: int = 0
    device: str = "cpu"


@dataclass(frozen=True)
class Adaptation:
    """What adaptation did: the model kept (``path``: None when the base model won) and the evidence."""
    path: Path | None
    kept: str  # "adapted" or "base"
    steps: int
    seconds: float
    seed: int
    heldout_patches: int
    train_pixels: int
    base_bpsp: float  # bits per sub-pixel written on the held-out patches by the base model ...
    adapted_bpsp: float  # ... and by the adapted one (headers included)

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "path"}


def slide_regions(slide, levels: list[int], count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` regions of up to REGION px on the patch grid of ``levels`` of ``slide`` (weighted by area),
    preferring tissue: of three candidates the one with the least background is read."""
    from .data import grid_patches
    from .training import background_mask
    sizes = np.array([slide.levels[i].width * slide.levels[i].height for i in levels], dtype=np.float64)
    regions = []
    for _ in range(count):
        best, best_background = None, 2.0
        for _ in range(3):
            lv_index = levels[int(rng.choice(len(levels), p=sizes / sizes.sum()))]
            lv = slide.levels[lv_index]
            h, w = min(REGION, lv.height), min(REGION, lv.width)
            if h < PATCH or w < PATCH:
                continue
            y = PATCH * int(rng.integers(0, (lv.height - h) // PATCH + 1))  # on the grid the level is coded on
            x = PATCH * int(rng.integers(0, (lv.width - w) // PATCH + 1))
            region = slide.read(lv_index, y, y + h, x, x + w)
            patches = grid_patches([region])
            background = float(background_mask(patches).mean()) if len(patches) else 1.0
            if background < best_background:
                best, best_background = region, background
            if background < 0.5:
                break
        if best is not None:
            regions.append(np.ascontiguousarray(best))
    return regions


def written_bpsp(patches: np.ndarray, model, device: str) -> tuple[float, list[bytes]]:
    from ..coding.batch import encode_patches
    blobs = encode_patches(patches, model=model, device=device)
    return 8 * sum(map(len, blobs)) / patches.size, blobs


def adapt_to_slide(slide, levels: list[int], base_path: Path, base_name: str, out_dir: Path,
                   settings: AdaptSettings) -> Adaptation:
    """Fine-tune the model file ``base_path`` on ``levels`` of ``slide``; export into ``out_dir`` when it wins."""
    from ..coding.batch import decode_patches
    from ..coding.model_file import load_coding_model
    from ..coding.runtime import torch
    from .data import grid_patches
    from .export import export_model, load_float_model
    from .data import CropSource
    from .training import TrainSettings, train
    t0 = time.monotonic()
    rng = np.random.default_rng(settings.seed)
    regions = slide_regions(slide, levels, TRAIN_REGIONS + HELDOUT_REGIONS, rng)
    if len(regions) < 2:
        raise WsiIdfError("the slide's IDF-coded levels are too small to adapt the model to (fewer than two regions)")
    held = max(1, len(regions) * HELDOUT_REGIONS // (TRAIN_REGIONS + HELDOUT_REGIONS))
    train_regions, heldout = regions[:-held], grid_patches(regions[-held:])
    try:
        float_model = load_float_model(base_path)
    except (KeyError, RuntimeError) as exc:
        raise WsiIdfError(f"{base_path.name} holds no float weights to fine-tune ({exc})") from None
    torch.manual_seed(settings.seed)
    limit = None if settings.steps else max(1.0, 60 * (settings.minutes or 0) - (time.monotonic() - t0))
    train_settings = TrainSettings(steps=settings.steps or 10**9, batch_size=ADAPT_BATCH, lr=ADAPT_LR, warmup=10,
                                   lr_half_life=10**9, ema_decay=0.98, quantize_from=0,
                                   eval_every=min(EVAL_EVERY, settings.steps or EVAL_EVERY), seed=settings.seed,
                                   time_limit_s=limit, align=CROP_GRID, augment=False)
    steps = []
    adapted = train(float_model, CropSource(train_regions), heldout, train_settings, device=settings.device,
                    log=lambda record: steps.append(record.get("step", 0)))
    path = export_model(adapted.cpu(), out_dir, f"{base_name}-adapted")
    coding = load_coding_model(path, settings.device)
    base_bpsp, _ = written_bpsp(heldout, base_path, settings.device)
    adapted_bpsp, blobs = written_bpsp(heldout, coding, settings.device)
    if not np.array_equal(decode_patches(blobs, model=coding, device=settings.device), heldout):
        raise WsiIdfError(f"{path.name}: the adapted model does not round-trip exactly; this is a bug, please report it")
    wins = adapted_bpsp < base_bpsp
    if not wins:
        path.unlink()
    result = Adaptation(path if wins else None, "adapted" if wins else "base", max(steps, default=0),
                        round(time.monotonic() - t0, 1), settings.seed, len(heldout),
                        sum(r.shape[0] * r.shape[1] for r in train_regions), round(base_bpsp, 4), round(adapted_bpsp, 4))
    log.info("adaptation: %d steps in %.0f s; held-out %d patches: base %.4f, adapted %.4f bits per sub-pixel; "
             "keeping the %s model", result.steps, result.seconds, result.heldout_patches, base_bpsp, adapted_bpsp,
             result.kept)
    return result


def auto_minutes(idf_pixels: int) -> float:
    """A budget by slide size: adaptation costs minutes and saves a share of the bits, so it pays on
    large slides. The weights cost nothing extra: an archive carries its model either way."""
    gigapixels = idf_pixels / 1e9
    if gigapixels < 0.05:
        return 0.0
    return float(min(10.0, max(2.0, 5.0 * gigapixels)))
