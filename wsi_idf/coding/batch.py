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

from . import patch_format as fmt
from ..config import CHANNELS, PATCH
from .entropy import LATENT_RANGE, pop, push
from ..errors import CorruptPatchError, InvalidPatchError, WeightsMismatchError
from .model_file import CodingModel
from .registry import get_model

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
                 top_priors: tuple[np.ndarray, np.ndarray]) -> bytes | None:
    """A version 2 (progressive) payload: one rANS stream per level, the top latents first.

    None when a latent leaves the range escapes can hold (only adversarial content gets there):
    the patch is then stored plain.
    """
    if any(np.abs(a[i]).max() > LATENT_RANGE for a in (top, *outs)):
        return None
    split_tables, top_tables = model.tables
    coder = constriction.stream.stack.AnsCoder()
    push(coder, top_tables, top[i].ravel(), *top_priors)
    streams = [coder.get_compressed()]
    for level in reversed(range(len(outs))):  # the coarsest split first
        coder = constriction.stream.stack.AnsCoder()
        values, rows, centres = outs[level][i].ravel(), priors[level][0][i].ravel(), priors[level][1][i].ravel()
        for mask in reversed(model.flow.pass_masks(outs[level].shape[1:])):  # a stack: the last pass first
            push(coder, split_tables, values[mask], rows[mask], centres[mask])
        streams.append(coder.get_compressed())
    return fmt.pack_streams(streams)


def _latents(model: CodingModel, x: np.ndarray):
    outs, priors, top = model.flow.forward(torch.from_numpy(x))
    ints = lambda t: t.cpu().numpy().astype(np.int64)  # exact: the flow computes integers
    return [ints(o) for o in outs], [(ints(p.rows), ints(p.centres)) for p in priors], ints(top)


def encode_patches(patches: np.ndarray, model: ModelArg = None, batch_size: int = 64,
                   device: str | torch.device | None = "cpu", timings: dict[str, float] | None = None,
                   positions: Sequence[fmt.Position] | None = None) -> list[bytes]:
    """Encode uint8 patches of shape (N, 3, 80, 80) to one self-describing byte string each.

    Each patch is stored in the smallest of its IDF, deflate and raw forms, so no patch ever
    costs more than raw plus the 17-byte header. ``timings``, when given, accumulates the
    seconds spent in the network (``model_s``) and in entropy coding (``entropy_s``).
    ``positions`` ((pyramid level, chunk row, chunk column) per patch) binds each patch to its
    place in an archive: its checksum then covers the position, and readers that know where a
    patch belongs refuse one found elsewhere.
    """
    patches = check_patches(patches)
    if positions is not None and len(positions) != len(patches):
        raise InvalidPatchError(f"{len(positions)} positions for {len(patches)} patches")
    places = [fmt.position_bytes(None if positions is None else tuple(positions[i])) for i in range(len(patches))]
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
            place = places[start + i]
            crc = fmt.pixel_checksum(patch, place)
            payload = _idf_payload(coding_model, outs, priors, top, i, top_priors)
            # deflate costs ~0.4 ms a patch and wins on flat or synthetic content
            plain = fmt.encode_plain(patch, coding_model.weights_id, crc, place)
            blobs.append(plain if payload is None else
                         min(fmt.pack(fmt.Mode.IDF, coding_model.weights_id, crc, payload, place), plain, key=len))
        timings["entropy_s"] = timings.get("entropy_s", 0.0) + time.perf_counter() - t1
    return blobs


def ideal_bits(patches: np.ndarray, model: ModelArg = None, device: str | torch.device | None = "cpu") -> np.ndarray:
    """Per patch, the integer model's NLL in bits: what an ideal entropy coder would write."""
    patches = check_patches(patches)
    coding_model = get_model(model, device)
    split_tables, top_tables = coding_model.tables
    outs, priors, top = _latents(coding_model, patches)
    rows, centres = _top_priors(coding_model, top.shape[1:])
    bits = np.zeros(len(patches))
    for i in range(len(patches)):
        bits[i] = top_tables.ideal_bits(top[i].ravel(), rows, centres) + sum(
            split_tables.ideal_bits(out[i].ravel(), p[0][i].ravel(), p[1][i].ravel()) for out, p in zip(outs, priors))
    return bits


def _stream_coders(payload: memoryview, version: int, streams: int, needed: int) -> list:
    """One rANS coder per level to pop from: version 1 shares one stack, version 2 has one each."""
    if version == 1:
        if len(payload) % 4 or not len(payload):
            raise ValueError(f"payload of {len(payload)} bytes is not a whole number of rANS words")
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
        return [coder] * streams
    return [constriction.stream.stack.AnsCoder(words)
            for words in fmt.unpack_streams(payload, streams, needed, version)]


def _decode_idf(model: CodingModel, payloads: list[memoryview], versions: list[int],
                levels: int | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """Decode IDF payloads in one batch; return pixels and {index: error} for damaged ones.

    With ``levels`` below the model's, only the top latents and the coarsest ``levels - 1`` splits
    are decoded; the finer latents are set to their prior's most likely value (a preview).
    """
    split_tables, top_tables = model.tables
    cfg, flow = model.config, model.flow
    needed = cfg.levels if levels is None else max(1, min(levels, cfg.levels))
    errors: dict[int, str] = {}
    coders = []
    for i, (payload, version) in enumerate(zip(payloads, versions)):
        try:
            coders.append(_stream_coders(payload, version, cfg.levels, needed))
        except Exception as exc:  # constriction rejects some malformed streams outright
            errors[i] = str(exc) if isinstance(exc, CorruptPatchError) else f"rANS stream is damaged ({exc})"
            coders.append(None)

    def pop_all(stream: int, tables, rows, centres, shape) -> np.ndarray:
        values = np.zeros((len(coders), rows.shape[-1]), dtype=np.int64)
        for i, patch_coders in enumerate(coders):
            if i in errors:
                continue
            try:
                values[i] = pop(patch_coders[stream], tables, rows[i], centres[i])
            except Exception as exc:
                errors[i] = f"rANS stream is damaged ({exc})"
        return values.reshape(shape)

    top_shape = flow.top_shape
    rows, centres = (np.broadcast_to(a, (len(coders), a.size)) for a in _top_priors(model, top_shape))
    floats = lambda a: torch.from_numpy(a.astype(np.float32)).to(flow.device)  # exact: |latents| <= 2**15
    ints = lambda t: t.reshape(len(coders), -1).cpu().numpy().astype(np.int64)
    z = floats(pop_all(0, top_tables, rows, centres, (len(coders), *top_shape)))
    stream = 1
    for level in reversed(range(cfg.levels)):
        exact = True
        if level < cfg.levels - 1:
            exact = stream < needed
            params = flow.split_params_for(level, z)
            shape = tuple(params.rows.shape)
            out = np.zeros((len(coders), int(np.prod(shape[1:]))), dtype=np.int64)
            for k, mask in enumerate(flow.pass_masks(shape[1:])):
                if k:  # a later pass's priors see the latents of the earlier ones
                    params = flow.split_params_for(level, z, floats(out.reshape(shape)), params)
                rows, centres = ints(params.rows)[:, mask], ints(params.centres)[:, mask]
                if stream < needed:
                    out[:, mask] = pop_all(stream, split_tables, rows, centres, rows.shape)
                else:  # not decoded: the prior's most likely value
                    out[:, mask] = centres + split_tables.mode_offsets[rows]
            stream += 1
            z = torch.cat([z, floats(out.reshape(shape)).to(z.dtype)], dim=1)
        z = flow.decode_level(level, z, exact)
    pixels = flow.to_pixels(z).cpu().numpy().astype(np.int64)
    if needed < cfg.levels:
        return pixels.clip(0, 255).astype(np.uint8), errors
    for i, patch_coders in enumerate(coders):
        if i not in errors and not all(coder.is_empty() for coder in patch_coders):
            errors[i] = "rANS stream has data left over after decoding: it is damaged"
        if i not in errors and (pixels[i].min() < 0 or pixels[i].max() > 255):
            errors[i] = "decoded values leave the pixel range: the stream is damaged"
    return pixels.clip(0, 255).astype(np.uint8), errors


def check_levels(levels: int | None, model: CodingModel) -> None:
    """A progressive decode reads 1 .. the model's flow levels."""
    if levels is not None and not 1 <= levels <= model.config.levels:
        raise InvalidPatchError(f"flow levels to decode must be 1 to {model.config.levels} for model "
                                f"{model.name!r}, got {levels}")


def decode_patches(blobs: Sequence[bytes], model: ModelArg = None, batch_size: int = 64,
                   device: str | torch.device | None = "cpu", levels: int | None = None,
                   positions: Sequence[fmt.Position] | None = None) -> np.ndarray:
    """Decode byte strings from ``encode_patches`` to uint8 (N, 3, 80, 80).

    ``model`` None takes the model each patch names; a model name takes that model with the
    weights each patch names; a model file or loaded model refuses patches written with
    other weights. Damaged data raises ``CorruptPatchError``; pixels are never guessed.

    ``levels`` (1 .. the model's levels) decodes a progressive preview from the coarsest
    levels' data only, filling the rest from the priors; the blobs may then be cut after
    those levels' streams (``preview_prefix``). None, or all levels, is the lossless decode.
    Deflate and raw patches always decode exactly.

    ``positions`` (where each blob was found in an archive) refuses a patch written for
    another place, or not bound to any: a moved or aliased chunk is damage, not a valid patch.
    """
    out = np.empty((len(blobs), CHANNELS, PATCH, PATCH), dtype=np.uint8)
    headers, payloads = [], []
    pending: dict[bytes, list[int]] = {}
    preview: set[int] = set()  # patches decoded from fewer levels: no pixel checksum applies
    for i, blob in enumerate(blobs):
        try:
            header, payload = fmt.unpack(blob)
            if positions is not None and header.position != tuple(positions[i]):
                where = "no place" if header.position is None else f"position {header.position}"
                raise CorruptPatchError(f"it was written for {where}, not {tuple(positions[i])} "
                                        "(level, row, column): a moved or aliased chunk")
            if header.mode != fmt.Mode.IDF:
                out[i] = fmt.decode_plain(header, payload)
        except CorruptPatchError as exc:
            raise CorruptPatchError(f"patch {i} is damaged: {exc}", index=i) from None
        headers.append(header)
        payloads.append(payload)
        if header.mode == fmt.Mode.IDF:
            pending.setdefault(header.weights_id, []).append(i)
    for weights_id, indices in pending.items():
        try:
            coding_model = get_model(model, device, weights=weights_id)
        except WeightsMismatchError as exc:
            exc.index = indices[0]
            raise
        check_levels(levels, coding_model)
        if levels is not None and levels < coding_model.config.levels:
            preview.update(indices)
        for start in range(0, len(indices), max(1, batch_size)):
            chunk = indices[start:start + batch_size]
            pixels, errors = _decode_idf(coding_model, [payloads[i] for i in chunk],
                                         [headers[i].version for i in chunk], levels)
            if errors:
                j = min(errors)
                raise CorruptPatchError(f"patch {chunk[j]} is damaged: {errors[j]}", index=chunk[j])
            out[chunk] = pixels
    for i, header in enumerate(headers):
        if i not in preview and fmt.header_checksum(header, out[i]) != header.crc32c:
            raise CorruptPatchError(f"patch {i} is damaged: pixel checksum (CRC32C) mismatch", index=i)
    return out


def preview_prefix(blob_head: bytes | memoryview, levels: int) -> int | None:
    """How many leading bytes of a stored patch ``decode_patches(levels=levels)`` needs.

    ``blob_head`` is the patch's first bytes (64 always suffice); returns -1 when the whole
    patch is needed (deflate, raw, version 1, or all levels), None when the head is too short.
    """
    if len(blob_head) < fmt.HEADER.size + fmt.POSITION.size:
        return None
    header, _ = fmt.unpack(bytes(blob_head[:fmt.HEADER.size + fmt.POSITION.size]))
    if header.mode != fmt.Mode.IDF or header.version == 1:
        return -1
    size = fmt.streams_prefix(blob_head[header.size:], levels, header.version)
    return size if size is None or size < 0 else header.size + size
