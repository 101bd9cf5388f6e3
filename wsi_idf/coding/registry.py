"""Models by name: the table of built-in models, a lab's own models, and model files given by path.

Built-in weight files live in ``wsi_idf/weights``; a lab's own in the user models folder
(``WSI_IDF_MODELS``, else ``$XDG_DATA_HOME/wsi-idf/models``, where ``wsi-idf train`` exports).
Both are named ``{name}-{sha256[:8]}.safetensors`` and the hash is checked when a file is loaded. Loaded models are cached per (file, device).
The table imports no torch: reading an archive's kept source tiles never loads it. Where the
network runs, and in what batches, is ``coding.policy``'s to decide.
"""
from __future__ import annotations


import os
import re
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
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]{0,63}")


def check_model_name(name: object) -> str:
    """A model name: letters, digits and ``_+-``, at most 64. Names come from archives, which may be
    hostile, so a name is only ever a label: it is never a path and never reaches one but as
    ``{name}-{hash}.safetensors`` inside the model folders."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = repr(name) if len(repr(name)) < 80 else repr(name)[:77] + "..."
        raise UnknownModelError(f"unknown model {shown}: not a model name (letters, digits and _+-, at most 64; "
                                "a model is named, never given as a path, in archive metadata)")
    return name


def user_models_dir() -> Path:
    """Where a lab's own models live: ``WSI_IDF_MODELS``, else ``$XDG_DATA_HOME/wsi-idf/models``."""
    if os.environ.get("WSI_IDF_MODELS"):
        return Path(os.environ["WSI_IDF_MODELS"]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "wsi-idf" / "models"


@dataclass(frozen=True)
class ModelChoice:
    """A model a user asked for, resolved to its file: what pack, the batch job and the codecs embed."""

    name: str
    path: Path
    sha256: str
    builtin: bool


def resolve_model(model: str | Path | None = None) -> ModelChoice:
    """A built-in name, a name in the user models folder (its newest file), or a model file's path."""
    from ..digests import file_sha256
    from .model_file import check_model_path, read_model_name, verify_file_hash
    spec = DEFAULT_MODEL if model is None else model
    if isinstance(spec, str) and spec in MODELS:
        path = weights_file(spec)
        return ModelChoice(spec, path, model_sha256(spec), True)
    if isinstance(spec, Path) or "/" in spec or spec.endswith(".safetensors"):
        path = Path(spec).expanduser()
        check_model_path(path)
        return ModelChoice(check_model_name(read_model_name(path)), path, verify_file_hash(path),
                           path.resolve().parent == WEIGHTS_DIR)
    name = check_model_name(spec)
    files = [p for p in user_models_dir().glob(f"{name}-*.safetensors") if _user_file_name(p.name, name)]
    if not files:
        raise UnknownModelError(f"unknown model {name!r}: built-in models are {', '.join(sorted(MODELS))}, and "
                                f"{user_models_dir()} has no {name}-*.safetensors (see wsi-idf models; a model "
                                "file can also be given by its path)")
    path = max(files, key=lambda p: (p.stat().st_mtime, p.name))
    check_model_path(path)
    return ModelChoice(name, path, file_sha256(path), False)


def user_models() -> list[tuple[str, Path]]:
    """(name, file) of the models in the user models folder, newest first per name (hashes are checked
    when one is used)."""
    folder = user_models_dir()
    found = []
    for path in sorted(folder.glob("*-*.safetensors")) if folder.is_dir() else []:
        name = path.name[:-len(".safetensors")].rsplit("-", 1)[0]
        if _NAME.fullmatch(name) and _user_file_name(path.name, name) and path.is_file() and not path.is_symlink():
            found.append((name, path))
    return sorted(found, key=lambda m: (m[0], -m[1].stat().st_mtime))


def _user_file_name(file_name: str, name: str) -> bool:
    suffix = file_name[len(name) + 1:-len(".safetensors")]
    return len(suffix) == 8 and set(suffix) <= _HEX


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
    inside ``WEIGHTS_DIR`` or the user models folder are returned, never a symlink.
    """
    if name is not None:
        check_model_name(name)
    if weights is None:
        return _regular(WEIGHTS_DIR / entry(name).weights) if name in MODELS or name is None \
            else resolve_model(name).path
    prefix = check_weights_id(weights)[:8]
    pattern = f"{name}-{prefix}.safetensors" if name else f"*-{prefix}.safetensors"
    matches = sorted(WEIGHTS_DIR.glob(pattern)) or sorted(user_models_dir().glob(pattern))
    if not matches:
        shipped = ", ".join(f"{e.name}={e.weights_id.hex()}" for e in MODELS.values())
        raise WeightsMismatchError(
            f"data was written with {'model ' + repr(name) + ' ' if name else ''}weights {prefix}, which this "
            f"wsi-idf does not have (current models: {shipped}); install the wsi-idf version that wrote it "
            f"or pass its model file (or put it in {user_models_dir()})")
    return _regular(matches[0])


def _regular(path: Path) -> Path:
    if path.is_symlink() or not path.is_file():
        raise WsiIdfError(f"{path} is not a regular model file (a link or something else): refused")
    return path


def get_model(model: str | Path | CodingModel | None = None, device: str | torch.device | None = "cpu",
              weights: str | bytes | None = None) -> CodingModel:
    """A loaded coding model: by name (built-in or in the user models folder; optionally with weights),
    by model-file path, or passed through.

    With ``weights`` given, a model whose weights differ raises ``WeightsMismatchError``.
    A path is the caller's own choice; the codecs only ever pass names (or embedded weights).
    """
    from .model_file import CodingModel, load_coding_model
    if isinstance(model, CodingModel):
        loaded = model
    else:
        dev = default_device(device)  # ``policy``
        if isinstance(model, Path) or (isinstance(model, str) and ("/" in model or model.endswith(".safetensors"))):
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
