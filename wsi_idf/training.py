"""Training of the float IDF on real tiles, with resumable safetensors checkpoints.

The coding model is derived afterwards by ``wsi_idf.model_file.export_model``.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .data import random_crops
from .flow import IDF

logger = logging.getLogger("wsi_idf.training")


@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    eval_every: int = 100
    seed: int = 0
    time_limit_s: float | None = None  # stop early (and checkpoint) after this long
    background_weight: float = 0.25  # loss weight of background crops: archives hold them, but they are easy


def background_mask(patches: np.ndarray) -> np.ndarray:
    """Which (N, 3, 80, 80) crops are glass/background: bright and nearly grey (no stain).

    >>> import numpy as np
    >>> background_mask(np.stack([np.full((3, 80, 80), 240, np.uint8), np.full((3, 80, 80), 120, np.uint8)])).tolist()
    [True, False]
    """
    x = patches.astype(np.int16)
    brightness = x.mean(axis=(1, 2, 3))
    saturation = (x.max(axis=1) - x.min(axis=1)).mean(axis=(1, 2))
    return (brightness > 215) & (saturation < 18)


class SlideCrops:
    """Random 80x80 crops from the level 0 of slide files (weighted by area), flipped and rotated."""

    def __init__(self, paths: list[Path]):
        from .slide import open_slide
        self.slides = [open_slide(p) for p in paths]
        sizes = np.array([s.levels[0].width * s.levels[0].height for s in self.slides], dtype=np.float64)
        self.p = sizes / sizes.sum()

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        from .config import PATCH
        out = np.empty((count, 3, PATCH, PATCH), dtype=np.uint8)
        for i, k in enumerate(rng.choice(len(self.slides), size=count, p=self.p)):
            slide = self.slides[k]
            lv = slide.levels[0]
            y, x = int(rng.integers(0, lv.height - PATCH + 1)), int(rng.integers(0, lv.width - PATCH + 1))
            crop = np.rot90(slide.read(0, y, y + PATCH, x, x + PATCH), k=int(rng.integers(4)))
            if rng.integers(2):
                crop = crop[:, ::-1]
            out[i] = crop.transpose(2, 0, 1)
        return out


class CropSource:
    """Training crops from tiles and slides, in proportion to their pixel counts."""

    def __init__(self, tiles: list[np.ndarray], slide_paths: list[Path] | None = None):
        self.tiles = tiles
        self.slides = SlideCrops(slide_paths) if slide_paths else None
        tile_px = sum(t.shape[0] * t.shape[1] for t in tiles)
        slide_px = sum(s.levels[0].width * s.levels[0].height for s in self.slides.slides) if self.slides else 0
        if tile_px + slide_px == 0:
            raise ValueError("no training data: no tiles and no slides")
        self.slide_share = slide_px / (tile_px + slide_px)

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        from_slides = int(rng.binomial(count, self.slide_share)) if self.slides else 0
        parts = []
        if count - from_slides:
            parts.append(random_crops(self.tiles, count - from_slides, rng))
        if from_slides:
            parts.append(self.slides.sample(from_slides, rng))
        return np.concatenate(parts)


def evaluate(model: IDF, patches: np.ndarray, batch_size: int = 64) -> float:
    """Float model NLL on fixed patches, in bits per sub-pixel."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        device = next(model.parameters()).device
        for start in range(0, len(patches), batch_size):
            nll, _ = model(torch.from_numpy(patches[start:start + batch_size]).to(device))
            total += float(nll.sum())
    model.train()
    return total / (len(patches) * patches[0].size)


def train(model: IDF, tiles: list[np.ndarray] | CropSource, val_patches: np.ndarray, settings: TrainSettings,
          checkpoint: str | Path | None = None, device: str = "cpu",
          log: Callable[[dict], None] | None = None) -> IDF:
    """Train ``model`` in place on random crops of ``tiles`` (or a ``CropSource`` of tiles and slides);
    resume from ``checkpoint`` if it exists. Background crops weigh ``settings.background_weight``."""
    source = tiles if isinstance(tiles, CropSource) else CropSource(tiles)
    model.to(device).train()
    optimizer = torch.optim.Adamax(model.parameters(), lr=settings.lr)
    step = 0
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt and ckpt.exists():
        state = load_file(str(ckpt))
        model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        step = int(state["step"].item())
    rng = np.random.default_rng(settings.seed + step)
    started, first_step = time.monotonic(), step
    while step < settings.steps:
        # warm up at every (re)start: the optimizer's moments are not checkpointed
        lr = settings.lr * min(1.0, (step - first_step + 1) / settings.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        crops = source.sample(settings.batch_size, rng)
        weights = torch.from_numpy(np.where(background_mask(crops), settings.background_weight, 1.0)).to(device)
        nll, _ = model(torch.from_numpy(crops).to(device))
        loss = (IDF.bits_per_subpixel(nll) * weights).sum() / weights.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        step += 1
        timed_out = settings.time_limit_s is not None and time.monotonic() - started > settings.time_limit_s
        if step % settings.eval_every == 0 or step == settings.steps or timed_out:
            record = {"step": step, "train_bpsp": loss.item(), "lr": lr,
                      "elapsed_s": round(time.monotonic() - started, 1)}
            if len(val_patches):
                record["val_bpsp"] = evaluate(model, val_patches)
            if log:
                log(record)
            if ckpt:
                save_checkpoint(model, step, ckpt)
        if timed_out:
            break
    return model


def save_checkpoint(model: IDF, step: int, path: Path) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors["step"] = torch.tensor([step])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"config": model.cfg.to_json()})
    tmp.replace(path)


def log_to(path: str | Path) -> Callable[[dict], None]:
    """A training log: one JSON line per evaluation in ``path``, also sent to the logger."""
    def write(record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        logger.info(json.dumps(record))
    return write


def find_training_data(folders: list[Path]) -> tuple[list[np.ndarray], list[Path]]:
    """Tiles (PNG/TIFF/JPEG images) and slide files (SVS, NDPI, MRXS, ...) below ``folders``."""
    from .data import TILE_SUFFIXES, read_rgb
    slide_suffixes = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".svslide"}
    tiles, slides = [], []
    for folder in folders:
        paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
        for path in paths:
            suffix = path.suffix.lower()
            if suffix in slide_suffixes or (suffix in {".tif", ".tiff"} and _is_pyramid(path)):
                slides.append(path)
            elif suffix in TILE_SUFFIXES:
                image = read_rgb(path)
                if image is not None and min(image.shape[:2]) >= 80:
                    tiles.append(image)
    return tiles, slides


def _is_pyramid(path: Path) -> bool:
    import tifffile
    try:
        with tifffile.TiffFile(path) as tif:
            return len(tif.series[0].levels) > 1 or tif.is_svs
    except Exception:
        return False


def train_model(name: str, data: list[Path], out: Path, val: list[Path] | None = None,
                settings: TrainSettings | None = None, init_from: Path | None = None, device: str = "cpu",
                val_patches: int = 128) -> dict:
    """Train a registered configuration (or fine-tune a model file) and export its exact coding model.

    Checkpoints to ``out/{name}.ckpt.safetensors`` (rerun to continue), logs train and validation
    bits per sub-pixel to ``out/{name}.log.jsonl``, exports ``out/{name}-{sha8}.safetensors``, and
    proves on the validation patches that the integer model round-trips exactly. Returns a summary
    with the float NLL and the bits the coding model actually writes.
    """
    from .coding import decode_patches, encode_patches
    from .data import grid_patches
    from .model_file import export_model, load_coding_model, load_float_model
    from .registry import MODELS, entry
    settings = settings or TrainSettings()
    config = entry(name).config if name in MODELS or init_from is None else None
    tiles, slides = find_training_data(list(data))
    val_tiles, _ = find_training_data(list(val or []))
    if not tiles and not slides:
        raise ValueError(f"no tiles or slides found in {', '.join(map(str, data))}")
    holdout = grid_patches(val_tiles) if val_tiles else grid_patches(tiles[-max(1, len(tiles) // 10):])
    holdout = np.ascontiguousarray(holdout[:: max(1, len(holdout) // val_patches)][:val_patches])
    model = load_float_model(init_from) if init_from else IDF(config)
    out.mkdir(parents=True, exist_ok=True)
    train(model, CropSource(tiles, slides), holdout, settings, checkpoint=out / f"{name}.ckpt.safetensors",
          device=device, log=log_to(out / f"{name}.log.jsonl"))
    path = export_model(model.cpu(), out, name)
    coding = load_coding_model(path, "cpu")
    blobs = encode_patches(holdout, model=coding)
    if not np.array_equal(decode_patches(blobs, model=coding), holdout):
        raise RuntimeError(f"{path.name}: the exported coding model does not round-trip exactly")
    return {"model": str(path), "sha256": coding.sha256, "val_patches": len(holdout),
            "val_float_bpsp": round(evaluate(model, holdout), 4),
            "val_coded_bpsp": round(8 * sum(map(len, blobs)) / holdout.size, 4), "round_trip": "exact",
            "tiles": len(tiles), "slides": len(slides)}
