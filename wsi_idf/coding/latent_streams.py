"""A patch's latents in and out of its rANS streams: the push order and its mirror pop order, side by side.

Stream layout of an IDF payload (patch format 2 and 3; version 1 shares one stack, read only):
stream 0 holds the top latents; then one stream per split, coarsest flow level first. Within a
split, the checkerboard passes are pushed last pass first, so they pop first pass first: a
later pass's priors see the latents of the earlier ones. ``encode`` and ``decode`` below are
each other's mirror and must change together (a change is a new patch format version).
"""
from __future__ import annotations

from dataclasses import dataclass

import constriction
import numpy as np
from .runtime import torch

from . import compiled_rans
from . import patch_format as fmt
from .entropy import LATENT_RANGE, pop, push
from ..errors import CorruptPatchError
from .model_file import CodingModel


@dataclass(frozen=True)
class Latents:
    """A batch's latents as int64: the split latents and their priors per flow level, and the top."""
    outs: list[np.ndarray]
    priors: list[tuple[np.ndarray, np.ndarray]]  # (table rows, centres) per flow level
    top: np.ndarray


class LatentStreams:
    """One coding model's entropy model: its tables, the stream layout, ``encode`` and ``decode``."""

    def __init__(self, model: CodingModel):
        self.model = model
        self.split_tables, self.top_tables = model.tables
        self.flow = model.flow

    def latents(self, x: np.ndarray) -> Latents:
        """Run the integer flow forward on uint8 patches (N, 3, 80, 80)."""
        outs, priors, top = self.flow.forward(torch.from_numpy(x))
        ints = lambda t: t.cpu().numpy().astype(np.int64)  # exact: the flow computes integers
        return Latents([ints(o) for o in outs], [(ints(p.rows), ints(p.centres)) for p in priors], ints(top))

    def top_priors(self, top_shape) -> tuple[np.ndarray, np.ndarray]:
        """(rows, centres) of the top latents: one table row per channel, the same for every patch."""
        channels, size = top_shape[0], int(np.prod(top_shape[1:]))
        rows = np.repeat(np.arange(channels), size)
        return rows, self.model.top_centre[rows]

    def ideal_bits(self, latents: Latents, i: int) -> float:
        rows, centres = self.top_priors(latents.top.shape[1:])
        return self.top_tables.ideal_bits(latents.top[i].ravel(), rows, centres) + sum(
            self.split_tables.ideal_bits(out[i].ravel(), p[0][i].ravel(), p[1][i].ravel())
            for out, p in zip(latents.outs, latents.priors))

    # push ------------------------------------------------------------------------------------
    def encode(self, latents: Latents, i: int) -> bytes | None:
        """Patch ``i``'s payload, one rANS stream per stream slot; None when a latent leaves the
        escape range (only adversarial content gets there): the patch is then stored plain."""
        outs, priors, top = latents.outs, latents.priors, latents.top
        if any(np.abs(a[i]).max() > LATENT_RANGE for a in (top, *outs)):
            return None
        coder = constriction.stream.stack.AnsCoder()
        push(coder, self.top_tables, top[i].ravel(), *self.top_priors(top.shape[1:]))
        streams = [coder.get_compressed()]
        for level in reversed(range(len(outs))):  # the coarsest split first
            coder = constriction.stream.stack.AnsCoder()
            values, rows, centres = outs[level][i].ravel(), priors[level][0][i].ravel(), priors[level][1][i].ravel()
            for mask in reversed(self.flow.pass_masks(outs[level].shape[1:])):  # a stack: the last pass first
                push(coder, self.split_tables, values[mask], rows[mask], centres[mask])
            streams.append(coder.get_compressed())
        return fmt.pack_streams(streams)

    def encode_batch(self, latents: Latents) -> list[bytes | None]:
        """``encode`` of every patch of the batch, byte for byte, with each stream slot of all patches
        coded in one compiled call (``compiled_rans``; constriction patch by patch without it)."""
        outs, top = latents.outs, latents.top
        n = len(top)
        if not compiled_rans.AVAILABLE or not n:
            return [self.encode(latents, i) for i in range(n)]
        fits = np.ones(n, dtype=bool)
        for a in (top, *outs):
            fits &= np.abs(a.reshape(n, -1)).max(axis=1) <= LATENT_RANGE
        kept = np.flatnonzero(fits)
        flat = (lambda a: a.reshape(n, -1)) if fits.all() else (lambda a: a.reshape(n, -1)[kept])  # noqa: E731
        rows, centres = self.top_priors(top.shape[1:])
        shape = (len(kept), rows.size)
        slots = [compiled_rans.encode_streams(self.top_tables.compiled, flat(top), np.broadcast_to(rows, shape),
                                              np.broadcast_to(centres, shape))]
        for level in reversed(range(len(outs))):  # the coarsest split first
            passes = [np.flatnonzero(m) for m in self.flow.pass_masks(outs[level].shape[1:])]
            rows, centres = latents.priors[level]
            slots.append(compiled_rans.encode_streams(self.split_tables.compiled, flat(outs[level]), flat(rows),
                                                      flat(centres), passes))
        payloads: list[bytes | None] = [None] * n
        for k, i in enumerate(kept):
            payloads[i] = fmt.pack_streams([slot[k] for slot in slots])
        return payloads

    # pop -------------------------------------------------------------------------------------
    @staticmethod
    def _stream_coders(payload: memoryview, version: int, streams: int, needed: int) -> list:
        """One rANS coder per level to pop from: version 1 shares one stack, version 2 has one each."""
        if version == 1:
            if len(payload) % 4 or not len(payload):
                raise ValueError(f"payload of {len(payload)} bytes is not a whole number of rANS words")
            coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
            return [coder] * streams
        return [constriction.stream.stack.AnsCoder(words)
                for words in fmt.unpack_streams(payload, streams, needed, version)]

    def decode(self, payloads: list[memoryview], versions: list[int],
               levels: int | None = None) -> tuple[np.ndarray, dict[int, str]]:
        """Pop a batch of payloads (``encode``'s mirror); return pixels and {index: error} for damaged ones.

        With ``levels`` below the model's, only the top latents and the coarsest ``levels - 1`` splits
        are decoded; the finer latents are set to their prior's most likely value (a preview).
        """
        split_tables, top_tables = self.split_tables, self.top_tables
        cfg, flow = self.model.config, self.flow
        needed = cfg.levels if levels is None else max(1, min(levels, cfg.levels))
        errors: dict[int, str] = {}
        compiled = compiled_rans.AVAILABLE and 1 not in versions  # version 1 shares one stack: constriction
        coders = []
        for i, (payload, version) in enumerate(zip(payloads, versions)):
            try:
                coders.append(fmt.unpack_streams(payload, cfg.levels, needed, version) if compiled
                              else self._stream_coders(payload, version, cfg.levels, needed))
            except Exception as exc:  # constriction rejects some malformed streams outright
                errors[i] = str(exc) if isinstance(exc, CorruptPatchError) else f"rANS stream is damaged ({exc})"
                coders.append(None)
        if compiled:  # one decoder per stream slot, for the whole batch
            decoders = [compiled_rans.StreamDecoders([None if i in errors else words[j]
                                                      for i, words in enumerate(coders)]) for j in range(needed)]
            for decoder in decoders:
                for i in np.flatnonzero(decoder.damaged):
                    errors.setdefault(int(i), "rANS stream is damaged (it ends in a zero word)")

        def compiled_decoder(stream: int) -> compiled_rans.StreamDecoders:
            decoders[stream].damaged[list(errors)] = 1  # patches found damaged so far are not popped further
            return decoders[stream]

        def pop_all(stream: int, tables, rows, centres, shape) -> np.ndarray:
            if compiled:
                return compiled_decoder(stream).pop(tables.compiled, rows, centres).reshape(shape)
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
        rows, centres = (np.broadcast_to(a, (len(coders), a.size)) for a in self.top_priors(top_shape))
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
                    if compiled and stream < needed:  # straight from the priors into out: no copies
                        compiled_decoder(stream).pop(split_tables.compiled, ints(params.rows), ints(params.centres),
                                                     np.flatnonzero(mask), out)
                        continue
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
        read = (np.logical_and.reduce([d.is_empty() for d in decoders]) if compiled
                else [i in errors or all(coder.is_empty() for coder in coders[i]) for i in range(len(coders))])
        for i in range(len(coders)):
            if i not in errors and not read[i]:
                errors[i] = "rANS stream has data left over after decoding: it is damaged"
            if i not in errors and (pixels[i].min() < 0 or pixels[i].max() > 255):
                errors[i] = "decoded values leave the pixel range: the stream is damaged"
        return pixels.clip(0, 255).astype(np.uint8), errors
