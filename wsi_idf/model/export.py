"""Export a trained float model (v1 IDF or v2 wavelet flow) to a model file with its exact integer
coding model; and the float model back from a file, for fine-tuning. Training-side only."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from ..config import T_MAX, IDFConfig, WaveletConfig
from ..digests import file_sha256
from .flow import IDF, QuantConv, QuantNet
from ..coding.model_file import (FILE_FORMAT, FILE_FORMAT_WAVELET, _config, _read, check_model_path, context_bounds,
                                 prior_bounds, verify_file_hash)
from .tables import split_table, top_table
from .wavelet_flow import HIGH_CHANNELS, STEP_CHANNELS, WaveletIDF


def _export_conv(conv: QuantConv) -> dict[str, np.ndarray]:
    """Integer weights, bias and shift: y = floor((conv(x, w) + bias) * 2**-shift) in output steps."""
    exponent = conv.weight_exponent().double().cpu().numpy()
    w_q = conv.integer_weight(torch.float64).cpu().numpy().astype(np.int8)
    out_scale = conv.out_scale.double().cpu().numpy()
    bias = conv.bias.detach().double().cpu().numpy() / out_scale + 0.5  # +0.5: floor rounds to nearest
    return {"weight": w_q, "bias": np.round(np.ldexp(bias, -exponent.astype(np.int64))).astype(np.int64),
            "shift": (-exponent).astype(np.int64)}


def _export_net(net: QuantNet, prefix: str, lo: np.ndarray, hi: np.ndarray) -> dict:
    convs = [net.conv_in, *[c for block in net.blocks for c in block], net.conv_out]
    tensors = {}
    for i, conv in enumerate(convs):
        for key, value in _export_conv(conv).items():
            tensors[f"{prefix}.{i}.{key}"] = value
    tensors[f"{prefix}.{len(convs) - 1}.lo"] = lo.astype(np.int64)
    tensors[f"{prefix}.{len(convs) - 1}.hi"] = hi.astype(np.int64)
    return tensors


def _idf_tensors(model: IDF) -> dict[str, np.ndarray]:
    cfg = model.cfg
    tensors: dict[str, np.ndarray] = {}
    for level, c in enumerate(cfg.level_channels()):
        half = c - c // 2
        for step in range(cfg.steps):
            tensors[f"perm.{level}.{step}"] = model.perm(level, step).cpu().numpy().astype(np.int64)
            tensors.update(_export_net(model.couplings[level][step], f"coupling.{level}.{step}",
                                       np.full(half, -T_MAX), np.full(half, T_MAX)))
        if level < cfg.levels - 1:
            tensors.update(_export_net(model.split_priors[level], f"prior.{level}", *prior_bounds(half)))
    tensors["split_freq"] = split_table()
    return tensors


def _wavelet_tensors(model: WaveletIDF) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for level, nets in enumerate(model.couplings):
        for step, net in enumerate(nets):
            tensors.update(_export_net(net, f"coupling.{level}.{step}", np.full(STEP_CHANNELS, -T_MAX),
                                       np.full(STEP_CHANNELS, T_MAX)))
    for level, net in enumerate(model.split_priors):
        tensors.update(_export_net(net, f"prior.{level}", *prior_bounds(HIGH_CHANNELS)))
    for level, net in enumerate(model.context_priors):  # outputs add to the prior's: the same units
        tensors.update(_export_net(net, f"context.{level}", *context_bounds(HIGH_CHANNELS)))
    tensors["split_freq"] = split_table(deterministic=True)
    return tensors


def export_model(model: IDF | WaveletIDF, directory: str | Path, name: str) -> Path:
    """Write ``{name}-{sha256[:8]}.safetensors`` with the integer coding model; return its path.

    The float weights are kept in float16 (for fine-tuning) and the integer model is derived
    from exactly those values, so exporting a loaded file reproduces it byte for byte.
    """
    model = copy.deepcopy(model).cpu()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())
    wavelet = isinstance(model, WaveletIDF)
    tensors = _wavelet_tensors(model) if wavelet else _idf_tensors(model)
    centres, freq = top_table(*(p.detach().double().cpu().numpy()
                                for p in (model.top_mean, model.top_log_scale, model.top_logits)),
                              deterministic=wavelet)
    tensors["top_centre"], tensors["top_freq"] = centres, freq
    for key, value in model.state_dict().items():
        if not key.startswith("perm_"):
            tensors[f"float.{key}"] = value.detach().half().cpu().numpy()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.tmp.safetensors"
    meta = {"format": FILE_FORMAT_WAVELET if wavelet else FILE_FORMAT, "name": name,
            "config": json.loads(model.cfg.to_json())}
    if wavelet:
        meta["flow"] = WaveletConfig.kind
    # one metadata key: safetensors keeps metadata in a hash map, so several keys come out in random order
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
              metadata={"wsi_idf": json.dumps(meta, sort_keys=True)})
    path = directory / f"{name}-{file_sha256(tmp)[:8]}.safetensors"
    tmp.replace(path)
    return path


def new_float_model(config: IDFConfig | WaveletConfig) -> IDF | WaveletIDF:
    """An untrained float model of a configuration (v1 IDF or v2 wavelet flow)."""
    return WaveletIDF(config) if isinstance(config, WaveletConfig) else IDF(config)


def load_float_model(path: str | Path) -> IDF | WaveletIDF:
    """The float (trainable) model stored in a model file, e.g. to fine-tune it on a lab's slides."""
    path = Path(path)
    check_model_path(path)
    verify_file_hash(path)
    tensors, meta = _read(path)
    model = new_float_model(_config(path, meta))
    state = {k[len("float."):]: torch.from_numpy(v.astype(np.float32)) for k, v in tensors.items()
             if k.startswith("float.")}
    state.update({k: v for k, v in model.state_dict().items() if k.startswith("perm_")})
    model.load_state_dict(state)
    return model
