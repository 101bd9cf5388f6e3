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


def train(model: IDF, tiles: list[np.ndarray], val_patches: np.ndarray, settings: TrainSettings,
          checkpoint: str | Path | None = None, device: str = "cpu",
          log: Callable[[dict], None] | None = None) -> IDF:
    """Train ``model`` in place on random crops of ``tiles``; resume from ``checkpoint`` if it exists."""
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
        batch = torch.from_numpy(random_crops(tiles, settings.batch_size, rng)).to(device)
        nll, _ = model(batch)
        loss = IDF.bits_per_subpixel(nll).mean()
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
