"""Batch encode/decode of 80x80 RGB patches: the public coding API over the integer flow and its streams.

These produce exactly the bytes the Zarr codecs store; pipelines call them with large
batches (one shard at a time) so the network runs batched on CPU or GPU.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from .runtime import torch

from . import patch_format as fmt
from ..config import CHANNELS, PATCH
from ..errors import CorruptPatchError, InvalidPatchError, WeightsMismatchError
from .latent_streams import LatentStreams
from .model_file import CodingModel
from .registry import get_model
from .threads import run_batches, shared_cores, split_batches

ModelArg = str | Path | CodingModel | None
T = TypeVar("T")
DEFAULT_BATCH = 64
# The per-patch "smallest of" mode also tries lossless JPEG XL at effort 3 where the IDF writes under
# 3 bits per sub-pixel: measured on 400 patches each (benchmarks/bench_patch_modes.py), JPEG XL wins
# there on unseen slides (flat and JPEG-marked patches: -0.8% CMU, -2.8% TCGA) for 7-11% of the
# IDF's encoding time; effort 3 on every patch cost ~20%, effort 4 ~50%; on val it wins nothing.
JXL_EFFORT = 3
JXL_BELOW_BITS = 3.0 * fmt.RAW_BYTES  # bits of the IDF form below which JPEG XL is tried


def on_cpu(model: CodingModel) -> bool:
    """Batches run side by side on CPU cores; a GPU takes them one at a time, each as large as allowed."""
    return model.flow.device.type == "cpu"


def in_batches(run: Callable[[range], T], count: int, batch_size: int, model: CodingModel) -> list[T]:
    """``run`` on batches of ``count`` items on this call's share of the cores: on CPU at least one
    batch per core, side by side; on a GPU batches of ``batch_size``, one at a time."""
    side_by_side = on_cpu(model)
    with shared_cores() as cores:  # concurrent calls split the cores instead of oversubscribing them
        return run_batches(run, split_batches(count, batch_size, cores.fit() if side_by_side else 1), cores,
                           side_by_side)


def check_patches(patches: np.ndarray) -> np.ndarray:
    if not isinstance(patches, np.ndarray):
        raise InvalidPatchError(f"patches must be a numpy array, got {type(patches).__name__}")
    if patches.dtype != np.uint8:
        raise InvalidPatchError(f"patches must be uint8 (8-bit RGB), got {patches.dtype}")
    if patches.ndim != 4 or patches.shape[1:] != (CHANNELS, PATCH, PATCH):
        raise InvalidPatchError(f"patches must have shape (N, {CHANNELS}, {PATCH}, {PATCH}), got {patches.shape}")
    return np.ascontiguousarray(patches)


def encode_patches(patches: np.ndarray, model: ModelArg = None, batch_size: int = DEFAULT_BATCH,
                   device: str | torch.device | None = "cpu", timings: dict[str, float] | None = None,
                   positions: Sequence[fmt.Position] | None = None, archive_id: bytes | None = None,
                   jxl_effort: int | None = JXL_EFFORT) -> list[bytes]:
    """Encode uint8 patches of shape (N, 3, 80, 80) to one self-describing byte string each.

    Each patch is stored in the smallest of its IDF, lossless JPEG XL (tried at ``jxl_effort`` where
    the IDF writes under 3 bits per sub-pixel; None: never), deflate and raw forms, so no patch ever
    costs more than raw plus the 17-byte header. ``timings``, when given, accumulates the
    seconds spent in the network (``model_s``) and in entropy coding (``entropy_s``).
    ``positions`` ((pyramid level, chunk row, chunk column) per patch) binds each patch to its
    place in an archive: its checksum then covers the position, and readers that know where a
    patch belongs refuse one found elsewhere. ``archive_id`` (16 bytes) binds them to one archive
    too (patch format 4): decoding then needs the same id.
    """
    patches = check_patches(patches)
    version = fmt.version_for(archive_id)
    if positions is not None and len(positions) != len(patches):
        raise InvalidPatchError(f"{len(positions)} positions for {len(patches)} patches")
    places = [fmt.position_bytes(None if positions is None else tuple(positions[i])) for i in range(len(patches))]
    coding_model = get_model(model, device)
    streams = LatentStreams(coding_model)
    timings = timings if timings is not None else {}

    def encode_batch(batch: range) -> tuple[list[bytes], float, float]:
        t0 = time.perf_counter()
        latents = streams.latents(patches[batch.start:batch.stop])
        t1 = time.perf_counter()
        payloads = streams.encode_batch(latents)
        blobs = []
        for i, payload in zip(batch, payloads):
            crc = fmt.pixel_checksum(patches[i], places[i] + (archive_id or b""))
            # deflate costs ~0.4 ms a patch and wins on flat or synthetic content
            plain = fmt.encode_plain(patches[i], coding_model.weights_id, crc, places[i], version)
            forms = [plain]
            if payload is not None:  # first: the IDF form wins ties
                forms.insert(0, fmt.pack(fmt.Mode.IDF, coding_model.weights_id, crc, payload, places[i], version))
            if jxl_effort is not None and (payload is None or 8 * len(payload) < JXL_BELOW_BITS):
                forms.append(fmt.encode_jxl(patches[i], coding_model.weights_id, crc, places[i], version, jxl_effort))
            blobs.append(min(forms, key=len))
        return blobs, t1 - t0, time.perf_counter() - t1

    done = in_batches(encode_batch, len(patches), batch_size, coding_model)
    blobs = [blob for batch_blobs, _, _ in done for blob in batch_blobs]
    timings["model_s"] = timings.get("model_s", 0.0) + sum(d[1] for d in done)
    timings["entropy_s"] = timings.get("entropy_s", 0.0) + sum(d[2] for d in done)
    return blobs


def ideal_bits(patches: np.ndarray, model: ModelArg = None, device: str | torch.device | None = "cpu") -> np.ndarray:
    """Per patch, the integer model's NLL in bits: what an ideal entropy coder would write."""
    patches = check_patches(patches)
    streams = LatentStreams(get_model(model, device))
    latents = streams.latents(patches)
    return np.array([streams.ideal_bits(latents, i) for i in range(len(patches))])


def check_levels(levels: int | None, model: CodingModel | None) -> None:
    """A progressive decode reads 1 .. the model's flow levels (no model: only kept tiles, always exact)."""
    if levels is not None and model is not None and not 1 <= levels <= model.config.levels:
        raise InvalidPatchError(f"flow levels to decode must be 1 to {model.config.levels} for model "
                                f"{model.name!r}, got {levels}")


def decode_patches(blobs: Sequence[bytes], model: ModelArg = None, batch_size: int = DEFAULT_BATCH,
                   device: str | torch.device | None = "cpu", levels: int | None = None,
                   positions: Sequence[fmt.Position] | None = None, archive_id: bytes | None = None) -> np.ndarray:
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
    ``archive_id``: the id of the archive the blobs were read from (patch format 4 needs it; a patch
    of another archive then fails its checksum).
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
        streams = LatentStreams(coding_model)

        def decode_batch(batch: range) -> list[tuple[int, str]]:
            """Decodes into ``out`` (batches own disjoint rows); returns (patch index, error) of damaged ones."""
            chunk = indices[batch.start:batch.stop]
            out[chunk], errors = streams.decode([payloads[i] for i in chunk], [headers[i].version for i in chunk],
                                                levels)
            return [(chunk[j], error) for j, error in errors.items()]

        damaged = [d for batch_damage in in_batches(decode_batch, len(indices), batch_size, coding_model)
                   for d in batch_damage]
        if damaged:
            i, error = min(damaged)
            raise CorruptPatchError(f"patch {i} is damaged: {error}", index=i)
    for i, header in enumerate(headers):
        if i in preview:
            continue
        try:
            ok = fmt.header_checksum(header, out[i], archive_id) == header.crc32c
        except CorruptPatchError as exc:
            raise CorruptPatchError(f"patch {i} cannot be checked: {exc}", index=i) from None
        if not ok:
            raise CorruptPatchError(f"patch {i} is damaged: pixel checksum (CRC32C) mismatch (or it belongs to another "
                                    "archive)", index=i)
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
