"""Registered models: one table of names, configurations and weight files.

Weight files live in ``wsi_idf/weights`` and are named ``{name}-{sha256[:8]}.safetensors``;
the hash is checked when a file is loaded. Loaded models are cached per (file, device).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import IDFConfig
from .entropy import TableModels
from .errors import UnknownModelError, WeightsMismatchError
from .model_file import CodingModel, load_coding_model

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config: IDFConfig
    weights: str  # file name in WEIGHTS_DIR
    description: str

    @property
    def weights_id(self) -> bytes:
        return bytes.fromhex(self.weights.rsplit("-", 1)[-1].split(".")[0])


MODELS: dict[str, ModelEntry] = {
    entry.name: entry for entry in [
        ModelEntry("fast", IDFConfig(levels=3, steps=4, width=32, blocks=1, seed=0), "fast-6ac0b3ba.safetensors",
                   "small ResNet couplings; decodes region reads on a CPU"),
        ModelEntry("max", IDFConfig(levels=3, steps=8, width=96, blocks=2, seed=1), "max-0a1b7f46.safetensors",
                   "best compression; meant for GPU packing"),
    ]
}
DEFAULT_MODEL = "fast"

_cache: dict[tuple[str, str], CodingModel] = {}
_lock = threading.Lock()


def default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def entry(name: str | None) -> ModelEntry:
    name = name or DEFAULT_MODEL
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}") from None


def entry_for_weights_id(weights_id: bytes) -> ModelEntry:
    for candidate in MODELS.values():
        if candidate.weights_id == weights_id:
            return candidate
    raise WeightsMismatchError(
        f"data was written with model weights {weights_id.hex()}, which this wsi-idf does not ship "
        f"(it has {', '.join(f'{e.name}={e.weights_id.hex()}' for e in MODELS.values())}); "
        "install the wsi-idf version that wrote it or pass its model file")


def get_model(model: str | Path | CodingModel | None = None, device: str | torch.device | None = "cpu") -> CodingModel:
    """A loaded coding model: by registered name, by model-file path, or passed through."""
    if isinstance(model, CodingModel):
        return model
    dev = default_device(device)
    path = Path(model) if isinstance(model, Path) or (isinstance(model, str) and model.endswith(".safetensors")) \
        else WEIGHTS_DIR / entry(model).weights
    key = (str(path), str(dev))
    with _lock:
        if key not in _cache:
            _cache[key] = load_coding_model(path, dev)
        return _cache[key]


def entropy_tables(model: CodingModel) -> tuple[TableModels, TableModels]:
    """(split-prior tables, top-prior tables), built once per loaded model."""
    with _lock:
        if model._entropy is None:
            model._entropy = (TableModels(model.split_freq), TableModels(model.top_freq))
        return model._entropy
