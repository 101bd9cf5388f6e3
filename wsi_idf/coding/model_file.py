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
from ..config import (ACT_LEVELS, CHANNELS, IN_MAX, IN_MIN, MEAN_STEPS, NUM_SCALES, SPLIT_WINDOW, T_MAX, TOP_WINDOW, IDFConfig,
                      WaveletConfig)
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


def read_model_name(path: Path) -> str:
    """The name a model file gives itself (its metadata), without reading its tensors."""
    _, meta = _read(path, tensors=False)
    return str(meta.get("name", path.stem.rsplit("-", 1)[0]))


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
    """A model file's exact coding model; its sha256 must match the prefix in its name."""
    path = Path(path)
    check_model_path(path)
    digest = verify_file_hash(path)
    tensors, meta = _read(path)
    return coding_model_from(tensors, meta, digest, device, path)


def coding_model_from(tensors: dict[str, np.ndarray], meta: dict, sha256: str,
                      device: str | torch.device = "cpu", path: Path | None = None) -> CodingModel:
    """The coding model of a model file's tensors, validated before use: a file may come from an archive
    (``embedded``), so shapes, clamp bounds and tables are checked, and a patch must round-trip."""
    where = path.name if path is not None else "embedded model"
    cfg = _config(Path(where), meta)
    check_config_bounds(cfg, where)
    try:
        model = _build(tensors, cfg, meta, sha256, device, path)
        _check_tables(model)
        smoke_test(model)
    except WsiIdfError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
        raise WsiIdfError(f"{where} is not a valid wsi-idf model ({type(exc).__name__}: {exc})") from None
    return model


def _build(tensors: dict[str, np.ndarray], cfg: IDFConfig | WaveletConfig, meta: dict, sha256: str,
           device: str | torch.device, path: Path | None) -> CodingModel:
    def net(prefix: str, blocks: int, bounds: tuple[np.ndarray, np.ndarray] | None) -> IntNet:
        layers, last = [], 1 + 2 * blocks
        for i in range(last + 1):
            key = f"{prefix}.{i}"
            weight = tensors[f"{key}.weight"]
            if weight.dtype != np.int8 or weight.ndim != 4 or weight.shape[2] != weight.shape[3] \
                    or weight.shape[2] % 2 == 0 or weight.shape[2] > 7:
                raise ValueError(f"{key}.weight is not an int8 odd square kernel")
            lo, hi = tensors.get(f"{key}.lo"), tensors.get(f"{key}.hi")
            if i == last:
                _check_clamp(key, lo, hi, weight.shape[0], bounds)
            layers.append(IntConv.build(weight, tensors[f"{key}.bias"], tensors[f"{key}.shift"],
                                        max_input=max(-IN_MIN, IN_MAX) if i == 0 else ACT_LEVELS, lo=lo, hi=hi))
        return IntNet(layers)

    if isinstance(cfg, WaveletConfig):
        high, step = 3 * CHANNELS, 2 * CHANNELS  # three high bands; a lifting step's sources and targets
        couplings = [[net(f"coupling.{lv}.{st}", cfg.blocks, coupling_bounds(step)) for st in range(len(LIFTING_STEPS))]
                     for lv in range(cfg.levels)]
        priors = [net(f"prior.{lv}", cfg.prior_blocks, prior_bounds(high)) for lv in range(cfg.levels - 1)]
        contexts = [net(f"context.{lv}", cfg.prior_blocks, context_bounds(high))
                    for lv in range(cfg.levels - 1 if cfg.context_width else 0)]
        flow = IntegerWaveletIDF(cfg, couplings, priors, contexts, device)
    else:
        channels = cfg.level_channels()
        perms = [[tensors[f"perm.{lv}.{st}"] for st in range(cfg.steps)] for lv in range(cfg.levels)]
        for lv, level in enumerate(perms):
            for perm in level:
                if sorted(np.asarray(perm).tolist()) != list(range(channels[lv])):
                    raise ValueError(f"a permutation of level {lv} is not one")
        couplings = [[net(f"coupling.{lv}.{st}", cfg.blocks, coupling_bounds(channels[lv] - channels[lv] // 2))
                      for st in range(cfg.steps)] for lv in range(cfg.levels)]
        priors = [net(f"prior.{lv}", cfg.blocks, prior_bounds(channels[lv] - channels[lv] // 2))
                  for lv in range(cfg.levels - 1)]
        flow = IntegerIDF(cfg, perms, couplings, priors, device)
    return CodingModel(str(meta.get("name", "model")), sha256, cfg, flow, tensors["split_freq"],
                       tensors["top_centre"], tensors["top_freq"], path)


def coupling_bounds(channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Clamp bounds of a coupling's translations: latents stay inside the escape range."""
    return np.full(channels, -T_MAX), np.full(channels, T_MAX)


def prior_bounds(channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Clamp bounds of a split prior's outputs: means (in 1/MEAN_STEPS), then scale indices."""
    lo = np.concatenate([np.full(channels, -LATENT_LIMIT), np.zeros(channels)])
    hi = np.concatenate([np.full(channels, LATENT_LIMIT), np.full(channels, NUM_SCALES - 1)])
    return lo, hi


def context_bounds(channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Clamp bounds of a context network's outputs: corrections to the prior's means and scale indices."""
    lo = np.concatenate([np.full(channels, -LATENT_LIMIT), np.full(channels, -(NUM_SCALES - 1))])
    hi = np.concatenate([np.full(channels, LATENT_LIMIT), np.full(channels, NUM_SCALES - 1)])
    return lo, hi


def _check_clamp(key: str, lo: np.ndarray | None, hi: np.ndarray | None, channels: int,
                 bounds: tuple[np.ndarray, np.ndarray]) -> None:
    """An output layer's clamp decides table rows and latent ranges: only the exported bounds pass,
    so no model file can index outside the tables."""
    if lo is None or hi is None or np.shape(lo) != (channels,) or np.shape(hi) != (channels,):
        raise ValueError(f"{key} lacks its clamp bounds for {channels} channels")
    if bounds[0].shape != (channels,) or (np.asarray(lo) < bounds[0]).any() or (np.asarray(hi) > bounds[1]).any() \
            or (np.asarray(lo) > np.asarray(hi)).any():
        raise ValueError(f"{key} clamps outside the bounds the coder allows")


def _check_tables(model: CodingModel) -> None:
    split_shape = (NUM_SCALES * MEAN_STEPS, 2 * SPLIT_WINDOW + 2)
    top_shape = (model.config.top_channels, 2 * TOP_WINDOW + 2)
    if model.split_freq.shape != split_shape or model.top_freq.shape != top_shape:
        raise ValueError(f"tables of shape {model.split_freq.shape} and {model.top_freq.shape}, not {split_shape} "
                         f"and {top_shape}")
    if model.top_centre.shape != (top_shape[0],) or np.abs(model.top_centre).max(initial=0) > LATENT_LIMIT:
        raise ValueError("top-prior centres out of shape or range")
    model.tables  # checks every row: frequencies >= 1 summing to 2**PROB_BITS


MAX_WIDTH, MAX_LEVELS, MAX_BLOCKS = 256, 4, 4  # bounds the work a model file can ask of a decoder


def check_config_bounds(cfg: IDFConfig | WaveletConfig, where: str) -> None:
    widths = [cfg.width] + ([cfg.prior_width, cfg.context_width] if isinstance(cfg, WaveletConfig) else [])
    blocks = [cfg.blocks] + ([cfg.prior_blocks] if isinstance(cfg, WaveletConfig) else [cfg.steps // 4])
    if not 1 <= cfg.levels <= MAX_LEVELS or max(widths) > MAX_WIDTH or min(widths) < 0 or max(blocks) > MAX_BLOCKS \
            or min(blocks) < 0:
        raise WsiIdfError(f"{where}: configuration {cfg} is larger than a wsi-idf model may be")
    try:
        cfg.check()
    except ValueError as exc:
        raise WsiIdfError(f"{where}: {exc}") from None


def smoke_test(model: CodingModel) -> None:
    """One random patch through the forward flow: a model whose layers do not fit together fails here."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (1, 3, 80, 80), dtype=np.uint8))
    outs, priors, top = model.flow.forward(x)
    if tuple(top.shape[1:]) != tuple(model.flow.top_shape):
        raise ValueError("the flow's top latents do not have the model's top shape")


CODING_FORMAT_KEY = "source_sha256"


def coding_file_bytes(path: Path) -> bytes:
    """The model file without its float (training) weights, as safetensors bytes: all a decoder needs.

    Its metadata names the sha256 of the whole file, which stays the model's identity (the id in
    every patch header); ``load_coding_bytes`` checks the pair.
    """
    from safetensors.numpy import save
    check_model_path(path)
    digest = verify_file_hash(path)
    tensors, meta = _read(path)
    meta = {**meta, CODING_FORMAT_KEY: digest}
    coding = {k: np.ascontiguousarray(v) for k, v in sorted(tensors.items()) if not k.startswith("float.")}
    return save(coding, metadata={"wsi_idf": json.dumps(meta, sort_keys=True)})


def load_coding_bytes(data: bytes, weights: str, device: str | torch.device = "cpu") -> CodingModel:
    """The coding model of ``coding_file_bytes`` output whose model is ``weights`` (a full sha256)."""
    from safetensors.numpy import load
    try:
        tensors = load(data)
        meta = json.loads(_metadata_of(data).get("wsi_idf", "{}"))
    except WsiIdfError:
        raise
    except Exception as exc:  # safetensors raises several types for damaged bytes
        raise WsiIdfError(f"embedded model is not a safetensors file: {exc}") from None
    if meta.get(CODING_FORMAT_KEY) != weights:
        raise WeightsMismatchError(f"embedded model is of weights {str(meta.get(CODING_FORMAT_KEY))[:16]}, "
                                   f"not {weights[:16]}: its array metadata is damaged")
    return coding_model_from(tensors, meta, weights, device)


def _metadata_of(data: bytes) -> dict:
    """The ``__metadata__`` of safetensors bytes (an 8-byte length, then a JSON header)."""
    if len(data) < 8:
        raise WsiIdfError("embedded model is too short to be safetensors")
    size = int.from_bytes(data[:8], "little")
    if size > min(len(data) - 8, 100 * 2**20):
        raise WsiIdfError("embedded model's safetensors header is out of bounds")
    header = json.loads(data[8:8 + size])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise WsiIdfError("embedded model's metadata is not a table")
    return meta
