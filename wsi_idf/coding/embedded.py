"""Model weights carried inside the array metadata that needs them.

An array written with the ``wsi_idf`` codec names its model by sha256 and carries the model's
coding tensors (``model_file.coding_file_bytes``: the model file without its float training
weights) in its codec configuration, xz-compressed and base64-encoded. So plain ``zarr.open`` in a
fresh process decodes it with nothing but wsi-idf installed, also when the model was trained by a
lab or adapted to the slide, and in decades when the package no longer ships those weights.

Why the configuration: zarr hands a codec its configuration and the chunk bytes, never the store,
so nothing else reaches the codec on every path that opens an array (zarr v2 and v3, Dask, a
numcodecs user). The price is ~0.4 MB of JSON per IDF-coded array.

The payload may come from a hostile archive: its size is bounded before decoding and while
decompressing, its sha256 is checked, and ``model_file.coding_model_from`` validates every
table and bound before the model is used. Nothing in it is ever a path.
"""
from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import lzma
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import WsiIdfError

if TYPE_CHECKING:
    from .model_file import CodingModel

FORMAT = "safetensors+xz+base64"
MAX_CODING_BYTES = 64 * 2**20  # a coding file is ~0.8 MB; a larger one is not wsi-idf's
MAX_PAYLOAD_CHARS = 2 * MAX_CODING_BYTES

_models: dict[tuple[str, str], CodingModel] = {}
_lock = threading.Lock()


@functools.lru_cache(maxsize=16)
def payload_for_file(path: Path, sha256: str) -> dict:
    """The ``embedded`` configuration entry of a model file (cached per process)."""
    from .model_file import coding_file_bytes
    data = coding_file_bytes(path)
    packed = lzma.compress(data, preset=6)
    return {"format": FORMAT, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
            "data": base64.b64encode(packed).decode("ascii")}


def check_payload(payload: object) -> dict:
    """The shape of an ``embedded`` entry, checked without decoding it."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise WsiIdfError(f"embedded model is not {FORMAT}: the array metadata is damaged or from a newer wsi-idf")
    sha, size, data = payload.get("sha256"), payload.get("size"), payload.get("data")
    if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= set("0123456789abcdef")):
        raise WsiIdfError("embedded model's sha256 is not 64 hex digits: the array metadata is damaged")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_CODING_BYTES:
        raise WsiIdfError(f"embedded model claims {size!r} bytes (at most {MAX_CODING_BYTES}): damaged")
    if not isinstance(data, str) or len(data) > MAX_PAYLOAD_CHARS:
        raise WsiIdfError("embedded model's data is not a bounded base64 string: damaged")
    return payload


def coding_bytes(payload: dict) -> bytes:
    """The coding file a payload carries, bounded and hash-checked."""
    check_payload(payload)
    try:
        packed = base64.b64decode(payload["data"], validate=True)
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        data = decompressor.decompress(packed, max_length=payload["size"] + 1)
    except (binascii.Error, lzma.LZMAError, ValueError) as exc:
        raise WsiIdfError(f"embedded model does not decode ({exc}): the array metadata is damaged") from None
    if len(data) != payload["size"] or not decompressor.eof:
        raise WsiIdfError(f"embedded model is not the {payload['size']} bytes it claims: damaged")
    if hashlib.sha256(data).hexdigest() != payload["sha256"]:
        raise WsiIdfError("embedded model's bytes do not match its sha256: the array metadata is damaged")
    return data


def configured_model(name: str, weights: str, payload: dict | None, device: str = "cpu") -> CodingModel:
    """The model an array's codec configuration names: the tensors it carries, else (configurations of
    wsi-idf 0.5 and older) the installed weights of that name. The one way codecs, readers and pack
    workers turn a configuration into a model."""
    if payload is None:
        from .registry import get_model
        return get_model(name, device, weights=weights)
    return load_embedded(payload, weights, device)


def load_embedded(payload: dict, weights: str, device: str = "cpu") -> CodingModel:
    """The coding model of an ``embedded`` entry whose model is ``weights`` (full sha256), cached per device."""
    from .model_file import load_coding_bytes
    key = (check_payload(payload)["sha256"] + weights, str(device))
    with _lock:
        if key not in _models:
            _models[key] = load_coding_bytes(coding_bytes(payload), weights, device)
        return _models[key]
