"""Model files: their format and loading the exact integer coding model from one.

A model file is safetensors (never pickle: loading must not run code). It holds the
integer coding model, the prior tables, the channel permutations and, under ``float.``,
the float weights for fine-tuning. The file name carries the first 8 hex digits of its
sha256, checked on every load (as CompressAI does). Writing one from a trained float model
is ``wsi_idf.model.export``; decoding never imports the float (training) models.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from .runtime import torch
from safetensors import safe_open

from ..digests import file_sha256
from ..config import ACT_LEVELS, IN_MAX, IN_MIN, MEAN_STEPS, IDFConfig, WaveletConfig
from .entropy import TableModels
from ..errors import WeightsMismatchError, WsiIdfError
from .integer_flow import IntConv, IntegerIDF, IntNet
from .integer_wavelet import IntegerWaveletIDF
from .lifting import LIFTING_STEPS

FILE_FORMAT = "wsi-idf-model/1"  # model v1: the IDF with random permutations
FILE_FORMAT_WAVELET = "wsi-idf-model/2"  # model v2: the wavelet-initialized flow
LATENT_LIMIT = 2**15 * MEAN_STEPS


@dataclass
class CodingModel:
    """Everything the coder needs: the integer flow, the prior tables, and the model's identity."""

    name: str
    sha256: str
    config: IDFConfig | WaveletConfig
    flow: IntegerIDF | IntegerWaveletIDF
    split_freq: np.ndarray  # int32 (NUM_SCALES * MEAN_STEPS, 2W+2)
    top_centre: np.ndarray  # int64 (C_top,)
    top_freq: np.ndarray  # int32 (C_top, 2W+2)
    path: Path | None = None

    @property
    def weights_id(self) -> bytes:
        """The 4 bytes of the weights hash stored in every patch header."""
        return bytes.fromhex(self.sha256[:8])

    @cached_property
    def tables(self) -> tuple[TableModels, TableModels]:
        """(split-prior, top-prior) entropy models, built once from the model's frequency tables."""
        return TableModels(self.split_freq), TableModels(self.top_freq)


def _read(path: Path, tensors: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get("wsi_idf", "{}"))
            return ({k: f.get_tensor(k) for k in f.keys()} if tensors else {}), meta
    except Exception as exc:  # safetensors raises several types for damaged files
        raise WsiIdfError(f"cannot read model file {path}: {exc}") from exc


def verify_file_hash(path: Path) -> str:
    """Check that the file's sha256 starts with the hash prefix in its name; return the full hash."""
    digest = file_sha256(path)
    prefix = path.stem.rsplit("-", 1)[-1]
    if not digest.startswith(prefix):
        raise WeightsMismatchError(f"model file {path.name} is damaged or altered: its sha256 is {digest[:16]}..., "
                                   f"the name promises {prefix}")
    return digest


def _config(path: Path, meta: dict) -> IDFConfig | WaveletConfig:
    if meta.get("format") == FILE_FORMAT:
        return IDFConfig(**meta["config"])
    if meta.get("format") == FILE_FORMAT_WAVELET and meta.get("flow") == WaveletConfig.kind:
        return WaveletConfig(**meta["config"])
    raise WsiIdfError(f"{path.name} is not a wsi-idf model file this version reads "
                      f"({FILE_FORMAT} or {FILE_FORMAT_WAVELET}); it says {meta.get('format')!r}")


MAX_MODEL_BYTES = 256 * 2**20  # model files are a few MB; a larger "model" is not one (e.g. /dev/zero)


def check_model_path(path: Path) -> None:
    """Only a regular file of bounded size is read as a model: hashing must end."""
    import stat
    try:
        info = path.stat()
    except OSError as exc:
        raise WsiIdfError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise WsiIdfError(f"{path} is not a regular file: not a model file")
    if info.st_size > MAX_MODEL_BYTES:
        raise WsiIdfError(f"{path} has {info.st_size} bytes, more than a model file may ({MAX_MODEL_BYTES})")


def load_coding_model(path: str | Path, device: str | torch.device = "cpu") -> CodingModel:
    path = Path(path)
    check_model_path(path)
    digest = verify_file_hash(path)
    tensors, meta = _read(path)
    cfg = _config(path, meta)

    def net(prefix: str, blocks: int) -> IntNet:
        layers = []
        for i in range(2 + 2 * blocks):
            key = f"{prefix}.{i}"
            layers.append(IntConv.build(tensors[f"{key}.weight"], tensors[f"{key}.bias"], tensors[f"{key}.shift"],
                                        max_input=max(-IN_MIN, IN_MAX) if i == 0 else ACT_LEVELS,
                                        lo=tensors.get(f"{key}.lo"), hi=tensors.get(f"{key}.hi")))
        return IntNet(layers)

    if isinstance(cfg, WaveletConfig):
        couplings = [[net(f"coupling.{lv}.{st}", cfg.blocks) for st in range(len(LIFTING_STEPS))]
                     for lv in range(cfg.levels)]
        priors = [net(f"prior.{lv}", cfg.prior_blocks) for lv in range(cfg.levels - 1)]
        contexts = [net(f"context.{lv}", cfg.prior_blocks) for lv in range(cfg.levels - 1 if cfg.context_width else 0)]
        flow = IntegerWaveletIDF(cfg, couplings, priors, contexts, device)
    else:
        perms = [[tensors[f"perm.{lv}.{st}"] for st in range(cfg.steps)] for lv in range(cfg.levels)]
        couplings = [[net(f"coupling.{lv}.{st}", cfg.blocks) for st in range(cfg.steps)] for lv in range(cfg.levels)]
        priors = [net(f"prior.{lv}", cfg.blocks) for lv in range(cfg.levels - 1)]
        flow = IntegerIDF(cfg, perms, couplings, priors, device)
    return CodingModel(meta.get("name", path.stem), digest, cfg, flow, tensors["split_freq"],
                       tensors["top_centre"], tensors["top_freq"], path)
