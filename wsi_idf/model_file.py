"""Model files: export a trained float IDF to its exact integer coding model, save and load it.

A model file is safetensors (never pickle: loading must not run code). It holds the
integer coding model, the prior tables, the channel permutations and, under ``float.``,
the float weights for fine-tuning. The file name carries the first 8 hex digits of its
sha256, checked on every load (as CompressAI does).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from .digests import file_sha256
from .config import ACT_LEVELS, IN_MAX, IN_MIN, MEAN_STEPS, NUM_SCALES, T_MAX, IDFConfig, WaveletConfig
from .errors import WeightsMismatchError, WsiIdfError
from .flow import IDF, QuantConv, QuantNet
from .integer_flow import IntConv, IntegerIDF, IntNet
from .integer_wavelet import IntegerWaveletIDF
from .lifting import LIFTING_STEPS
from .tables import split_table, top_table
from .wavelet_flow import HIGH_CHANNELS, STEP_CHANNELS, WaveletIDF

FILE_FORMAT = "wsi-idf-model/1"  # model v1: the IDF with random permutations
FILE_FORMAT_WAVELET = "wsi-idf-model/2"  # model v2: the wavelet-initialized flow
LATENT_LIMIT = 2**15 * MEAN_STEPS


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
            tensors.update(_export_net(model.split_priors[level], f"prior.{level}", *_prior_bounds(half)))
    tensors["split_freq"] = split_table()
    return tensors


def _wavelet_tensors(model: WaveletIDF) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for level, nets in enumerate(model.couplings):
        for step, net in enumerate(nets):
            tensors.update(_export_net(net, f"coupling.{level}.{step}", np.full(STEP_CHANNELS, -T_MAX),
                                       np.full(STEP_CHANNELS, T_MAX)))
    for level, net in enumerate(model.split_priors):
        tensors.update(_export_net(net, f"prior.{level}", *_prior_bounds(HIGH_CHANNELS)))
    for level, net in enumerate(model.context_priors):  # outputs add to the prior's: the same units
        tensors.update(_export_net(net, f"context.{level}", *_context_bounds(HIGH_CHANNELS)))
    tensors["split_freq"] = split_table(deterministic=True)
    return tensors


def _prior_bounds(channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Clamp bounds of a split prior's outputs: means (in 1/MEAN_STEPS), then scale indices."""
    lo = np.concatenate([np.full(channels, -LATENT_LIMIT), np.zeros(channels)])
    hi = np.concatenate([np.full(channels, LATENT_LIMIT), np.full(channels, NUM_SCALES - 1)])
    return lo, hi


def _context_bounds(channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Clamp bounds of a context network's outputs: corrections to the prior's means and scale indices."""
    lo = np.concatenate([np.full(channels, -LATENT_LIMIT), np.full(channels, -(NUM_SCALES - 1))])
    hi = np.concatenate([np.full(channels, LATENT_LIMIT), np.full(channels, NUM_SCALES - 1)])
    return lo, hi


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
    _entropy: object = field(default=None, repr=False)

    @property
    def weights_id(self) -> bytes:
        """The 4 bytes of the weights hash stored in every patch header."""
        return bytes.fromhex(self.sha256[:8])


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
