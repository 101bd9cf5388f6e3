"""Registered models: one table of names, configurations and weight files.

Weight files live in ``wsi_idf/weights`` and are named ``{name}-{sha256[:8]}.safetensors``;
the hash is checked when a file is loaded. Loaded models are cached per (file, device).
The table imports no torch: reading an archive's kept source tiles never loads it. Where the
network runs, and in what batches, is ``coding.policy``'s to decide.
"""
from __future__ import annotations


import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import IDFConfig, WaveletConfig
from ..errors import UnknownModelError, WeightsMismatchError, WsiIdfError
from .policy import default_device

if TYPE_CHECKING:
    import torch

    from .model_file import CodingModel

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


@dataclass(frozen=True)
class Measured:
    """What ``make bench`` measured for a model file (648 val patches, 2 CPU threads)."""

    val_bpsp: float  # bits per sub-pixel actually written
    jxl_e9_ratio: float  # val_bpsp / JPEG XL e9's in the same run
    heldout_bpsp: float  # on patches of the two real SVS slides (other scanners, never trained on)
    decode_mpx_s: float  # megapixels per second decoded on 2 CPU threads
    date: str


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config: IDFConfig | WaveletConfig
    weights: str  # file name in WEIGHTS_DIR
    description: str
    measured: Measured | None = None

    @property
    def weights_id(self) -> bytes:
        return bytes.fromhex(self.weights.rsplit("-", 1)[-1].split(".")[0])


MODELS: dict[str, ModelEntry] = {
    entry.name: entry for entry in [
        ModelEntry("fast", WaveletConfig(levels=3, width=32, blocks=1, prior_width=32, prior_blocks=1, context_width=32),
                   "fast-e02fec51.safetensors",
                   "model v2: YCoCg-R + 5/3 lifting with learned residuals, checkerboard-context priors, width 32",
                   Measured(3.037, 0.942, 2.386, 2.11, "2026-12-02")),
    ]
}
# Weights of earlier versions, no longer written but decoded forever: archives name the
# weights they were written with. Looked up by the hash in each patch header.
RETIRED: tuple[ModelEntry, ...] = (
    ModelEntry("fast", WaveletConfig(levels=3, width=32, blocks=1, prior_width=32, prior_blocks=1, context_width=32),
               "fast-80565552.safetensors", "model v2 after 8,750 steps (wsi-idf 0.3.0 default)",
               Measured(3.099, 0.961, 2.432, 2.14, "2026-12-02")),
    ModelEntry("fast", IDFConfig(levels=3, steps=4, width=32, blocks=1, seed=0), "fast-01b41279.safetensors",
               "model v1 (wsi-idf 0.1, default until model v2)", Measured(3.745, 1.162, 2.805, 0.610, "2026-11-25")),
    ModelEntry("fast", IDFConfig(levels=3, steps=4, width=32, blocks=1, seed=0), "fast-29461924.safetensors",
               "model v1 (wsi-idf 0.1, first release)"),
    ModelEntry("max", IDFConfig(levels=3, steps=8, width=96, blocks=2, seed=1), "max-c2b8d2d9.safetensors",
               "model v1 (wsi-idf 0.1), compressed worse than fast",
               Measured(4.667, 1.448, 3.107, 0.060, "2026-11-25")),
)
DEFAULT_MODEL = "fast"

_cache: dict[tuple[str, str], CodingModel] = {}
_lock = threading.Lock()


def model_sha256(name: str | None) -> str:
    """The sha256 of a registered model's file, without loading the model (e.g. in a job's client)."""
    from ..digests import file_sha256
    from .model_file import check_model_path
    path = weights_file(name)
    check_model_path(path)
    return file_sha256(path)


def entry(name: str | None) -> ModelEntry:
    name = name or DEFAULT_MODEL
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}") from None


MODEL_NAMES = frozenset([*MODELS, *(e.name for e in RETIRED)])
_HEX = frozenset("0123456789abcdef")


def check_model_name(name: object) -> str:
    """A registered model name, refused otherwise: names come from archives, which may be hostile,
    so nothing but a name in the table may ever reach a file path."""
    if not isinstance(name, str) or name not in MODEL_NAMES:
        shown = repr(name) if len(repr(name)) < 80 else repr(name)[:77] + "..."
        raise UnknownModelError(f"unknown model {shown}; this wsi-idf knows {', '.join(sorted(MODEL_NAMES))} "
                                "(a model is named, never given as a path, in archive metadata)")
    return name


def check_weights_id(weights: object) -> str:
    """Weights as lower-case hex of 8 to 64 digits (a sha256 or its prefix), or the 4-byte id."""
    if isinstance(weights, bytes) and len(weights) == 4:
        return weights.hex()
    if isinstance(weights, str) and 8 <= len(weights) <= 64 and set(weights) <= _HEX:
        return weights
    shown = repr(weights) if len(repr(weights)) < 80 else repr(weights)[:77] + "..."
    raise WeightsMismatchError(f"weights {shown} are not a sha256 in hex (8 to 64 digits): the metadata naming "
                               "them is damaged")


def weights_file(name: str | None = None, weights: str | bytes | None = None) -> Path:
    """The model file of a registered name, or of given weights (a sha256 hex or the 4-byte id).

    Weight files are never deleted when a model is retrained: archives name the weights
    they were written with, and those must decode in every later version. Only regular files
    inside ``WEIGHTS_DIR`` are returned, never a symlink.
    """
    if name is not None:
        check_model_name(name)
    if weights is None:
        return _regular(WEIGHTS_DIR / entry(name).weights)
    prefix = check_weights_id(weights)[:8]
    pattern = f"{name}-{prefix}.safetensors" if name else f"*-{prefix}.safetensors"
    matches = sorted(WEIGHTS_DIR.glob(pattern))
    if not matches:
        shipped = ", ".join(f"{e.name}={e.weights_id.hex()}" for e in MODELS.values())
        raise WeightsMismatchError(
            f"data was written with {'model ' + repr(name) + ' ' if name else ''}weights {prefix}, which this "
            f"wsi-idf does not have (current models: {shipped}); install the wsi-idf version that wrote it "
            "or pass its model file")
    return _regular(matches[0])


def _regular(path: Path) -> Path:
    if path.is_symlink() or not path.is_file():
        raise WsiIdfError(f"{path} is not a regular model file (a link or something else): refused")
    return path


def get_model(model: str | Path | CodingModel | None = None, device: str | torch.device | None = "cpu",
              weights: str | bytes | None = None) -> CodingModel:
    """A loaded coding model: by registered name (and optionally weights), by model-file path, or passed through.

    With ``weights`` given, a model whose weights differ raises ``WeightsMismatchError``.
    A path is the caller's own choice; the codecs only ever pass registered names.
    """
    from .model_file import CodingModel, load_coding_model
    if isinstance(model, CodingModel):
        loaded = model
    else:
        dev = default_device(device)  # ``policy``
        if isinstance(model, Path) or (isinstance(model, str) and model.endswith(".safetensors")):
            path = Path(model)
        else:
            path = weights_file(model, weights)
        key = (str(path), str(dev))
        with _lock:
            if key not in _cache:
                _cache[key] = load_coding_model(path, dev)
            loaded = _cache[key]
    if weights is not None:
        expected = check_weights_id(weights)
        if not loaded.sha256.startswith(expected):
            raise WeightsMismatchError(
                f"data was written with weights {expected[:16]}, but model {loaded.name!r} has weights "
                f"{loaded.sha256[:16]}: decoding with other weights cannot be exact")
    return loaded
