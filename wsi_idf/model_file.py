"""Model files: export a trained float IDF to its exact integer coding model, save and load it.

A model file is safetensors (never pickle: loading must not run code). It holds the
integer coding model, the prior tables, the channel permutations and, under ``float.``,
the float weights for fine-tuning. The file name carries the first 8 hex digits of its
sha256, checked on every load (as CompressAI does).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from .config import (ACT_LEVELS, ACT_MAX, IN_DIV, IN_MAX, IN_MIN, MEAN_STEPS, NUM_SCALES, REQUANT_SHIFT, T_MAX,
                     WEIGHT_LEVELS, IDFConfig)
from .errors import WeightsMismatchError, WsiIdfError
from .flow import IDF, QuantConv, QuantNet
from .integer_flow import IntConv, IntegerIDF, IntNet
from .tables import split_table, top_table

FILE_FORMAT = "wsi-idf-model/1"
LATENT_LIMIT = 2**15 * MEAN_STEPS


def _export_conv(conv: QuantConv, first: bool, units: np.ndarray | None) -> dict[str, np.ndarray]:
    w = conv.weight.detach().double().cpu().numpy()
    s_w = conv.weight_scale().double().cpu().numpy()
    w_q = np.clip(np.round(w / s_w[:, None, None, None]), -WEIGHT_LEVELS, WEIGHT_LEVELS).astype(np.int8)
    s_in = 1.0 / IN_DIV if first else ACT_MAX / ACT_LEVELS
    unit = np.full(w.shape[0], ACT_LEVELS / ACT_MAX) if units is None else units
    bias = conv.bias.detach().double().cpu().numpy()
    scale = 2.0**REQUANT_SHIFT
    return {"weight": w_q, "mult": np.round(s_w * s_in * unit * scale).astype(np.int64),
            "offset": np.floor((bias * unit + 0.5) * scale).astype(np.int64)}


def _export_net(net: QuantNet, prefix: str, units: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> dict:
    convs = [net.conv_in, *[c for block in net.blocks for c in block], net.conv_out]
    tensors = {}
    for i, conv in enumerate(convs):
        last = i == len(convs) - 1
        for key, value in _export_conv(conv, first=i == 0, units=units if last else None).items():
            tensors[f"{prefix}.{i}.{key}"] = value
    tensors[f"{prefix}.{len(convs) - 1}.lo"] = lo.astype(np.int64)
    tensors[f"{prefix}.{len(convs) - 1}.hi"] = hi.astype(np.int64)
    return tensors


def export_model(model: IDF, directory: str | Path, name: str) -> Path:
    """Write ``{name}-{sha256[:8]}.safetensors`` with the integer coding model; return its path."""
    cfg = model.cfg
    tensors: dict[str, np.ndarray] = {}
    for level, c in enumerate(cfg.level_channels()):
        half = c - c // 2
        for step in range(cfg.steps):
            tensors[f"perm.{level}.{step}"] = model.perm(level, step).cpu().numpy().astype(np.int64)
            tensors.update(_export_net(model.couplings[level][step], f"coupling.{level}.{step}",
                                       np.ones(half), np.full(half, -T_MAX), np.full(half, T_MAX)))
        if level < cfg.levels - 1:
            units = np.concatenate([np.full(half, MEAN_STEPS), np.ones(half)])
            lo = np.concatenate([np.full(half, -LATENT_LIMIT), np.zeros(half)])
            hi = np.concatenate([np.full(half, LATENT_LIMIT), np.full(half, NUM_SCALES - 1)])
            tensors.update(_export_net(model.split_priors[level], f"prior.{level}", units, lo, hi))
    tensors["split_freq"] = split_table()
    centres, freq = top_table(*(p.detach().double().cpu().numpy()
                                for p in (model.top_mean, model.top_log_scale, model.top_logits)))
    tensors["top_centre"], tensors["top_freq"] = centres, freq
    for key, value in model.state_dict().items():
        if not key.startswith("perm_"):
            tensors[f"float.{key}"] = value.detach().float().cpu().numpy()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.tmp.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
              metadata={"format": FILE_FORMAT, "name": name, "config": cfg.to_json()})
    path = directory / f"{name}-{file_sha256(tmp)[:8]}.safetensors"
    tmp.replace(path)
    return path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class CodingModel:
    """Everything the coder needs: the integer flow, the prior tables, and the model's identity."""

    name: str
    sha256: str
    config: IDFConfig
    flow: IntegerIDF
    split_freq: np.ndarray  # int32 (NUM_SCALES * MEAN_STEPS, 2W+2)
    top_centre: np.ndarray  # int64 (C_top,)
    top_freq: np.ndarray  # int32 (C_top, 2W+2)
    path: Path | None = None
    _entropy: object = field(default=None, repr=False)

    @property
    def weights_id(self) -> bytes:
        """The 4 bytes of the weights hash stored in every patch header."""
        return bytes.fromhex(self.sha256[:8])


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
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


def load_coding_model(path: str | Path, device: str | torch.device = "cpu") -> CodingModel:
    path = Path(path)
    digest = verify_file_hash(path)
    tensors, meta = _read(path)
    if meta.get("format") != FILE_FORMAT:
        raise WsiIdfError(f"{path.name} is not a {FILE_FORMAT} model file")
    cfg = IDFConfig.from_json(meta["config"])

    def net(prefix: str) -> IntNet:
        n_layers = 2 + 2 * cfg.blocks
        layers = []
        for i in range(n_layers):
            key = f"{prefix}.{i}"
            layers.append(IntConv.build(tensors[f"{key}.weight"], tensors[f"{key}.mult"], tensors[f"{key}.offset"],
                                        max_input=max(-IN_MIN, IN_MAX) if i == 0 else ACT_LEVELS,
                                        lo=tensors.get(f"{key}.lo"), hi=tensors.get(f"{key}.hi")))
        return IntNet(layers)

    perms = [[tensors[f"perm.{lv}.{st}"] for st in range(cfg.steps)] for lv in range(cfg.levels)]
    couplings = [[net(f"coupling.{lv}.{st}") for st in range(cfg.steps)] for lv in range(cfg.levels)]
    priors = [net(f"prior.{lv}") for lv in range(cfg.levels - 1)]
    flow = IntegerIDF(cfg, perms, couplings, priors, device)
    return CodingModel(meta.get("name", path.stem), digest, cfg, flow, tensors["split_freq"],
                       tensors["top_centre"], tensors["top_freq"], path)


def load_float_model(path: str | Path) -> IDF:
    """The float (trainable) model stored in a model file, e.g. to fine-tune it on a lab's slides."""
    path = Path(path)
    verify_file_hash(path)
    tensors, meta = _read(path)
    model = IDF(IDFConfig.from_json(meta["config"]))
    state = {k[len("float."):]: torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith("float.")}
    state.update({k: v for k, v in model.state_dict().items() if k.startswith("perm_")})
    model.load_state_dict(state)
    return model


def describe(path: str | Path) -> dict:
    """Name, config and hash of a model file, without building the model."""
    path = Path(path)
    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata() or {})
    return {"name": meta.get("name"), "config": json.loads(meta.get("config", "{}")), "file": path.name}
