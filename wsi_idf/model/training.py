"""Training of the float IDF on real tiles, with resumable safetensors checkpoints.

The coding model is derived afterwards by ``wsi_idf.model.export.export_model``.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config import WaveletConfig
from .data import CropSource, find_training_data

logger = logging.getLogger("wsi_idf.model.training")


@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50  # steps of linear warm-up at the first start (optimizer state is checkpointed)
    lr_half_life: int = 8000  # the learning rate halves every this many steps ...
    lr_min: float = 5e-5  # ... down to this floor
    ema_decay: float = 0.999  # validation, selection and export use the EMA of the weights
    quantize_from: int = 0  # step from which training is quantization-aware (float before: faster learning)
    eval_every: int = 100
    seed: int = 0
    time_limit_s: float | None = None  # stop early (and checkpoint) after this long
    cpu_limit_s: float | None = None  # or after this much process CPU time (same-budget comparisons)
    align: int = 1  # crop corners on this grid (8: the JPEG block grid most slides were scanned with)
    zoom: float = 0.0  # share of tile crops taken at half resolution (2x2 means: a pyramid level's statistics)
    background_weight: float = 0.25  # loss weight of background crops: archives hold them, but they are easy
    augment: bool = True  # random flips and 90-degree rotations (off: crops exactly as a slide is coded)

    def lr_at(self, step: int) -> float:
        return max(self.lr_min, self.lr * 0.5 ** (step / self.lr_half_life)) * min(1.0, (step + 1) / self.warmup)


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


def evaluate(model: torch.nn.Module, patches: np.ndarray, batch_size: int = 64) -> float:
    """Float model NLL on fixed patches, in bits per sub-pixel."""
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        device = next(model.parameters()).device
        for start in range(0, len(patches), batch_size):
            nll, _ = model(torch.from_numpy(patches[start:start + batch_size]).to(device))
            total += float(nll.sum())
    model.train(was_training)
    return total / (len(patches) * patches[0].size)


class EMA:
    """Exponential moving average of a model's weights (what is validated, selected and exported)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, updates: int) -> None:
        decay = min(self.decay, (1 + updates) / (10 + updates))  # short memory while the run is young
        for ema_p, p in zip(self.shadow.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - decay)


def train(model: torch.nn.Module, tiles: list[np.ndarray] | CropSource, val_patches: np.ndarray,
          settings: TrainSettings, checkpoint: str | Path | None = None, device: str = "cpu",
          log: Callable[[dict], None] | None = None) -> torch.nn.Module:
    """Train ``model`` on random crops of ``tiles`` (or a ``CropSource`` of tiles and slides); resume
    from ``checkpoint`` if it exists. Returns the EMA model with the best validation NLL seen so far.

    Float until ``settings.quantize_from``, quantization-aware after; learning rate with warm-up
    and exponential decay; the checkpoint holds the weights, their EMA, the best EMA, the
    optimizer's moments and the step, so a restart continues the same run.
    """
    from .flow import set_quantized
    source = tiles if isinstance(tiles, CropSource) else CropSource(tiles)
    model.to(device).train()
    optimizer = torch.optim.Adamax(model.parameters(), lr=settings.lr)
    ema = EMA(model, settings.ema_decay)
    best, best_val, step = copy.deepcopy(ema.shadow), float("inf"), 0
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt and ckpt.exists():
        step, best_val = load_checkpoint(ckpt, model, ema.shadow, best, optimizer)
    rng = np.random.default_rng(settings.seed + step)
    if log:
        log({"event": "start", "step": step})  # CPU clocks in later records restart here
    started, cpu_started = time.monotonic(), time.process_time()
    while step < settings.steps:
        quantize = step >= settings.quantize_from
        for m in (model, ema.shadow):  # the kept best keeps the stage it was selected in
            set_quantized(m, quantize)
        lr = settings.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        crops = source.sample(settings.batch_size, rng, settings.align, settings.zoom, settings.augment)
        weights = torch.from_numpy(np.where(background_mask(crops), settings.background_weight, 1.0)).to(device)
        nll, _ = model(torch.from_numpy(crops).to(device))
        loss = (model.bits_per_subpixel(nll) * weights).sum() / weights.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        ema.update(model, step)
        step += 1
        timed_out = (settings.time_limit_s is not None and time.monotonic() - started > settings.time_limit_s
                     or settings.cpu_limit_s is not None and time.process_time() - cpu_started > settings.cpu_limit_s)
        if step % settings.eval_every == 0 or step == settings.steps or timed_out:
            record = {"step": step, "train_bpsp": round(loss.item(), 5), "lr": lr, "quantized": quantize,
                      "elapsed_s": round(time.monotonic() - started, 1), "cpu_s": round(time.process_time(), 1)}
            if len(val_patches):
                record["val_bpsp"] = round(evaluate(ema.shadow, val_patches), 5)
                if record["val_bpsp"] < best_val or quantize and not best_is_quantized(best):
                    best_val = record["val_bpsp"]
                    best.load_state_dict(ema.shadow.state_dict())
                    set_quantized(best, quantize)
                record["best_val_bpsp"] = round(best_val, 5)
            if log:
                log(record)
            if ckpt:
                save_checkpoint(ckpt, step, model, ema.shadow, best, best_val, optimizer)
        if timed_out:
            break
    if not len(val_patches):
        return ema.shadow
    return best


def best_is_quantized(model: torch.nn.Module) -> bool:
    """Whether a kept model was selected during the quantization-aware stage (float ones then give way)."""
    from .flow import QuantNet
    return all(m.quantize for m in model.modules() if isinstance(m, QuantNet))


def save_checkpoint(path: Path, step: int, model: torch.nn.Module, ema: torch.nn.Module, best: torch.nn.Module,
                    best_val: float, optimizer: torch.optim.Optimizer) -> None:
    tensors = {}
    for prefix, m in (("model", model), ("ema", ema), ("best", best)):
        tensors.update({f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in m.state_dict().items()})
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["step"] = torch.tensor([step])
    tensors["best_val"] = torch.tensor([best_val], dtype=torch.float64)
    tensors["best_quantized"] = torch.tensor([int(best_is_quantized(best))])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"config": model.cfg.to_json(), "kind": model_kind(model)})
    tmp.replace(path)


def load_checkpoint(path: Path, model: torch.nn.Module, ema: torch.nn.Module, best: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> tuple[int, float]:
    """Restore a checkpoint into the given objects; return (step, best validation). Checkpoints of
    wsi-idf 0.1 hold only the weights: EMA and best start from them, the optimizer afresh."""
    from .flow import set_quantized
    state = load_file(str(path))
    weights = {k[6:]: v for k, v in state.items() if k.startswith("model.")}
    _load_weights(model, weights)
    for prefix, m in (("ema", ema), ("best", best)):
        _load_weights(m, {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")} or weights)
    set_quantized(best, bool(state.get("best_quantized", torch.tensor([0])).item()))
    optim_state = optimizer.state_dict()
    for key, value in state.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            optim_state["state"].setdefault(int(i), {})[name] = value
    optimizer.load_state_dict(optim_state)
    return int(state["step"].item()), float(state["best_val"].item()) if "best_val" in state else float("inf")


# Configurations in training that are not shipped yet (a model is registered once it earns its name).
# ``max``: the shipped fast model grown (``grow``) by a 4th level and a second residual block per network.
CANDIDATES = {"max": WaveletConfig(levels=4, width=32, blocks=2, prior_width=32, prior_blocks=2, context_width=32)}


def grow(model: torch.nn.Module, smaller: torch.nn.Module) -> torch.nn.Module:
    """Start ``model`` as the trained ``smaller`` model, so that added capacity only learns improvements.

    Every tensor of the same name and shape is copied. A residual block the smaller network lacks gets a
    zero second convolution: it passes its input unchanged (activations are already clamped and on the
    grid). Added levels start as the plain 5/3 wavelet (zero-initialized couplings); the top prior keeps
    the smaller model's parameters. Widths must match.
    """
    from .flow import QuantNet
    if model_kind(model) != model_kind(smaller):
        raise ValueError(f"cannot grow a {model_kind(smaller)} model into a {model_kind(model)} model")
    own, given = model.state_dict(), smaller.state_dict()
    misfit = [k for k, v in given.items() if k in own and own[k].shape != v.shape]
    lost = [k for k in given if k not in own]
    if misfit or lost:
        raise ValueError(f"cannot grow: {', '.join((misfit + lost)[:5])} do not fit the larger model")
    model.load_state_dict({k: v for k, v in given.items()}, strict=False)
    with torch.no_grad():
        for name, net in model.named_modules():
            if isinstance(net, QuantNet):
                for i, (_, conv_b) in enumerate(net.blocks):
                    if f"{name}.blocks.{i}.1.weight" not in given:
                        conv_b.weight.zero_()
                        conv_b.bias.zero_()
    return model


GROWABLE = ("context_priors.",)  # zero-initialized parts a checkpoint may lack: they start as no change


def _load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's weights; parts added since (``GROWABLE``) keep their zero initialization."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    wrong = [k for k in missing if not k.startswith(GROWABLE)] + list(unexpected)
    if wrong:
        raise ValueError(f"checkpoint does not fit this model: {', '.join(wrong[:5])}")


def model_kind(model: torch.nn.Module) -> str:
    return getattr(model.cfg, "kind", "idf")


def log_to(path: str | Path) -> Callable[[dict], None]:
    """A training log: one JSON line per evaluation in ``path``, also sent to the logger."""
    def write(record: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        logger.info(json.dumps(record))
    return write


def train_model(name: str, data: list[Path], out: Path, val: list[Path] | None = None,
                settings: TrainSettings | None = None, init_from: Path | None = None, device: str = "cpu",
                val_patches: int = 256, export: bool = True, grow_from: Path | None = None,
                export_dir: Path | None = None, progress: bool = False) -> dict:
    """Train a registered configuration (or fine-tune a model file) and export its exact coding model.

    Checkpoints to ``out/{name}.ckpt.safetensors`` (rerun to continue), logs train and validation
    bits per sub-pixel to ``out/{name}.log.jsonl``, exports ``{export_dir or out}/{name}-{sha8}.safetensors``
    (``wsi-idf train`` exports into the user models folder, where ``pack --model NAME`` finds it), and
    proves on the validation patches that the integer model round-trips exactly. Returns a summary
    with the float NLL and the bits the coding model actually writes. The exported weights are the
    EMA with the best validation NLL seen (``export=False`` only trains and checkpoints).
    ``grow_from``: a smaller model file that a new run of a larger configuration starts as (``grow``).
    Validation: ``val``, else a tenth of the tiles (left out of training), else a band of each slide
    (the bottom tenth of its rows, never trained on). The summary gives the bits written on it before
    (by ``init_from``, or the untrained model's float NLL) and after.
    """
    from ..coding.batch import decode_patches, encode_patches
    from .data import grid_patches
    from .export import export_model, load_float_model, new_float_model
    from ..coding.model_file import load_coding_model
    from ..coding.registry import MODELS, entry
    settings = settings or TrainSettings()
    config = CANDIDATES.get(name) or (entry(name).config if name in MODELS or init_from is None else None)
    tiles, slides = find_training_data(list(data))
    val_tiles, _ = find_training_data(list(val or []))
    if not tiles and not slides:
        raise ValueError(f"no tiles or slides found in {', '.join(map(str, data))}")
    holdout_share = 0.0
    if val_tiles:
        holdout = grid_patches(val_tiles)
    elif len(tiles) >= 2:  # a tenth of the tiles, left out of training
        held = max(1, len(tiles) // 10)
        holdout, tiles = grid_patches(tiles[-held:]), tiles[:-held]
    else:  # slides (and at most one tile): the bottom tenth of each slide's rows
        holdout_share = 0.1
        holdout = np.empty((0, 3, 80, 80), np.uint8)
    source = CropSource(tiles, slides, holdout_share)
    if holdout_share:
        holdout = source.slides.heldout(val_patches)
    if not len(holdout):
        raise ValueError("no validation patches: give --val, more tiles, or slides of at least 800 rows")
    holdout = np.ascontiguousarray(holdout[:: max(1, len(holdout) // val_patches)][:val_patches])
    model = load_float_model(init_from) if init_from else new_float_model(config)
    if grow_from and not (out / f"{name}.ckpt.safetensors").exists():
        model = grow(model, load_float_model(grow_from))
    before = (8 * sum(map(len, encode_patches(holdout, model=Path(init_from)))) / holdout.size if init_from
              else evaluate(model, holdout))
    out.mkdir(parents=True, exist_ok=True)
    model = train(model, source, holdout, settings, checkpoint=out / f"{name}.ckpt.safetensors",
                  device=device, log=_with_progress(log_to(out / f"{name}.log.jsonl"), settings, progress))
    if not export:
        return {"checkpoint": str(out / f"{name}.ckpt.safetensors"), "val_float_bpsp": round(evaluate(model, holdout), 4)}
    path = export_model(model.cpu(), export_dir or out, name)
    coding = load_coding_model(path, "cpu")
    blobs = encode_patches(holdout, model=coding)
    if not np.array_equal(decode_patches(blobs, model=coding), holdout):
        raise RuntimeError(f"{path.name}: the exported coding model does not round-trip exactly")
    return {"model": str(path), "sha256": coding.sha256, "val_patches": len(holdout),
            "val_source": "--val" if val_tiles else "held-out slide rows" if holdout_share else "held-out tiles",
            "val_bpsp_before": round(before, 4), "before": "bits written by --init-from" if init_from else
            "float NLL of the untrained model", "val_float_bpsp": round(evaluate(model, holdout), 4),
            "val_coded_bpsp": round(8 * sum(map(len, blobs)) / holdout.size, 4), "round_trip": "exact",
            "tiles": len(tiles), "slides": len(slides)}


def _with_progress(log: Callable[[dict], None], settings: TrainSettings,
                   progress: bool) -> Callable[[dict], None]:
    """The log, and a progress bar over steps (or minutes) on a terminal showing the validation bits."""
    if not progress:
        return log
    from tqdm import tqdm
    bar = tqdm(total=settings.steps if not settings.time_limit_s else None, desc="training", unit="step",
               disable=None)
    done = [0]

    def write(record: dict) -> None:
        log(record)
        step = record.get("step", 0)
        if record.get("event") == "start":
            bar.update(step - done[0])
        elif "val_bpsp" in record:
            bar.update(step - done[0])
            bar.set_postfix(val_bpsp=record["val_bpsp"], best=record.get("best_val_bpsp"))
        done[0] = step
    return write
