"""Batch encode/decode of 80x80 RGB patches: the integer IDF, rANS, and the patch format.

These produce exactly the bytes the Zarr codecs store; pipelines call them with large
batches (one shard at a time) so the network runs batched on CPU or GPU.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import constriction
import numpy as np
import torch
import torch.nn.functional as F

from . import patch_format as fmt
from .config import CHANNELS, PATCH
from .entropy import pop, push
from .errors import CorruptPatchError, InvalidPatchError
from .model_file import CodingModel
from .registry import entropy_tables, get_model

ModelArg = str | Path | CodingModel | None


def check_patches(patches: np.ndarray) -> np.ndarray:
    if not isinstance(patches, np.ndarray):
        raise InvalidPatchError(f"patches must be a numpy array, got {type(patches).__name__}")
    if patches.dtype != np.uint8:
        raise InvalidPatchError(f"patches must be uint8 (8-bit RGB), got {patches.dtype}")
    if patches.ndim != 4 or patches.shape[1:] != (CHANNELS, PATCH, PATCH):
        raise InvalidPatchError(f"patches must have shape (N, {CHANNELS}, {PATCH}, {PATCH}), got {patches.shape}")
    return np.ascontiguousarray(patches)


def _top_priors(model: CodingModel, top_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    channels, size = top_shape[0], int(np.prod(top_shape[1:]))
    rows = np.repeat(np.arange(channels), size)
    return rows, model.top_centre[rows]


def _idf_payload(model: CodingModel, outs, priors, top: np.ndarray, i: int,
                 top_priors: tuple[np.ndarray, np.ndarray]) -> bytes:
    split_tables, top_tables = entropy_tables(model)
    coder = constriction.stream.stack.AnsCoder()
    for level, out in enumerate(outs):  # finest level first: it is popped last
        push(coder, split_tables, out[i].ravel(), priors[level][0][i].ravel(), priors[level][1][i].ravel())
    push(coder, top_tables, top[i].ravel(), *top_priors)
    return coder.get_compressed().astype("<u4").tobytes()


def _latents(model: CodingModel, x: np.ndarray):
    outs, priors, top = model.flow.forward(torch.from_numpy(x))
    ints = lambda t: t.cpu().numpy().astype(np.int64)  # exact: the flow computes integers
    return [ints(o) for o in outs], [(ints(p.rows), ints(p.centres)) for p in priors], ints(top)


def encode_patches(patches: np.ndarray, model: ModelArg = None, batch_size: int = 64,
                   device: str | torch.device | None = "cpu", timings: dict[str, float] | None = None) -> list[bytes]:
    """Encode uint8 patches of shape (N, 3, 80, 80) to one self-describing byte string each.

    Each patch is stored in the smallest of its IDF, deflate and raw forms, so no patch ever
    costs more than raw plus the 12-byte header. ``timings``, when given, accumulates the
    seconds spent in the network (``model_s``) and in entropy coding (``entropy_s``).
    """
    patches = check_patches(patches)
    coding_model = get_model(model, device)
    blobs: list[bytes] = []
    timings = timings if timings is not None else {}
    for start in range(0, len(patches), max(1, batch_size)):
        batch = patches[start:start + batch_size]
        t0 = time.perf_counter()
        outs, priors, top = _latents(coding_model, batch)
        t1 = time.perf_counter()
        timings["model_s"] = timings.get("model_s", 0.0) + t1 - t0
        top_priors = _top_priors(coding_model, top.shape[1:])  # the same for every patch
        for i, patch in enumerate(batch):
            crc = fmt.pixel_checksum(patch)
            payload = _idf_payload(coding_model, outs, priors, top, i, top_priors)
            # deflate costs ~0.4 ms a patch and wins on flat or synthetic content
            blobs.append(min(fmt.pack(fmt.Mode.IDF, coding_model.weights_id, crc, payload),
                             fmt.encode_plain(patch, coding_model.weights_id, crc), key=len))
        timings["entropy_s"] = timings.get("entropy_s", 0.0) + time.perf_counter() - t1
    return blobs


def ideal_bits(patches: np.ndarray, model: ModelArg = None, device: str | torch.device | None = "cpu") -> np.ndarray:
    """Per patch, the integer model's NLL in bits: what an ideal entropy coder would write."""
    patches = check_patches(patches)
    coding_model = get_model(model, device)
    split_tables, top_tables = entropy_tables(coding_model)
    outs, priors, top = _latents(coding_model, patches)
    rows, centres = _top_priors(coding_model, top.shape[1:])
    bits = np.zeros(len(patches))
    for i in range(len(patches)):
        bits[i] = top_tables.ideal_bits(top[i].ravel(), rows, centres) + sum(
            split_tables.ideal_bits(out[i].ravel(), p[0][i].ravel(), p[1][i].ravel()) for out, p in zip(outs, priors))
    return bits


def _decode_idf(model: CodingModel, payloads: list[memoryview]) -> tuple[np.ndarray, dict[int, str]]:
    """Decode IDF payloads in one batch; return pixels and {index: error} for damaged ones."""
    split_tables, top_tables = entropy_tables(model)
    errors: dict[int, str] = {}
    coders = []
    for i, payload in enumerate(payloads):
        try:
            if len(payload) % 4 or not len(payload):
                raise ValueError(f"payload of {len(payload)} bytes is not a whole number of rANS words")
            coders.append(constriction.stream.stack.AnsCoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32)))
        except Exception as exc:  # constriction rejects some malformed streams outright
            errors[i] = str(exc)
            coders.append(None)

    def pop_all(tables, rows, centres, shape) -> np.ndarray:
        values = np.zeros((len(coders), rows.shape[-1]), dtype=np.int64)
        for i, coder in enumerate(coders):
            if i in errors:
                continue
            try:
                values[i] = pop(coder, tables, rows[i], centres[i])
            except Exception as exc:
                errors[i] = f"rANS stream is damaged ({exc})"
        return values.reshape(shape)

    cfg, flow = model.config, model.flow
    side = PATCH // 2**cfg.levels
    top_shape = (cfg.level_channels()[-1], side, side)
    rows, centres = (np.broadcast_to(a, (len(coders), a.size)) for a in _top_priors(model, top_shape))
    floats = lambda a: torch.from_numpy(a.astype(np.float32)).to(flow.device)  # exact: |latents| < 2**15
    ints = lambda t: t.reshape(len(coders), -1).cpu().numpy().astype(np.int64)
    z = floats(pop_all(top_tables, rows, centres, (len(coders), *top_shape)))
    for level in reversed(range(cfg.levels)):
        if level < cfg.levels - 1:
            params = flow.split_params_for(level, z)
            out = pop_all(split_tables, ints(params.rows), ints(params.centres), tuple(z.shape))
            z = torch.cat([z, floats(out)], dim=1)
        z = F.pixel_shuffle(flow.inverse_level(level, z), 2)
    pixels = (z + 128).cpu().numpy().astype(np.int64)
    for i, coder in enumerate(coders):
        if i not in errors and not coder.is_empty():
            errors[i] = "rANS stream has data left over after decoding: it is damaged"
        if i not in errors and (pixels[i].min() < 0 or pixels[i].max() > 255):
            errors[i] = "decoded values leave the pixel range: the stream is damaged"
    return pixels.clip(0, 255).astype(np.uint8), errors


def decode_patches(blobs: Sequence[bytes], model: ModelArg = None, batch_size: int = 64,
                   device: str | torch.device | None = "cpu") -> np.ndarray:
    """Decode byte strings from ``encode_patches`` to uint8 (N, 3, 80, 80).

    ``model`` None takes the model each patch names; a model name takes that model with the
    weights each patch names; a model file or loaded model refuses patches written with
    other weights. Damaged data raises ``CorruptPatchError``; pixels are never guessed.
    """
    out = np.empty((len(blobs), CHANNELS, PATCH, PATCH), dtype=np.uint8)
    headers, payloads = [], []
    pending: dict[bytes, list[int]] = {}
    for i, blob in enumerate(blobs):
        try:
            header, payload = fmt.unpack(blob)
            if header.mode != fmt.Mode.IDF:
                out[i] = fmt.decode_plain(header, payload)
        except CorruptPatchError as exc:
            raise CorruptPatchError(f"patch {i} is damaged: {exc}") from None
        headers.append(header)
        payloads.append(payload)
        if header.mode == fmt.Mode.IDF:
            pending.setdefault(header.weights_id, []).append(i)
    for weights_id, indices in pending.items():
        coding_model = get_model(model, device, weights=weights_id)
        for start in range(0, len(indices), max(1, batch_size)):
            chunk = indices[start:start + batch_size]
            pixels, errors = _decode_idf(coding_model, [payloads[i] for i in chunk])
            if errors:
                j = min(errors)
                raise CorruptPatchError(f"patch {chunk[j]} is damaged: {errors[j]}")
            out[chunk] = pixels
    for i, header in enumerate(headers):
        if fmt.pixel_checksum(out[i]) != header.crc32c:
            raise CorruptPatchError(f"patch {i} is damaged: pixel checksum (CRC32C) mismatch")
    return out
