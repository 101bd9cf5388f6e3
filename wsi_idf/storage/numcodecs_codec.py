"""The ``wsi_idf`` numcodecs codec (Zarr format 2, and the engine behind the v3 codec).

Each chunk is one (3, 80, 80) uint8 patch. The stored configuration pins the model by
name and weights hash, so an archive never silently decodes with other weights.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numcodecs.abc import Codec
from numcodecs.compat import ensure_contiguous_ndarray, ndarray_copy

from ..config import CHANNELS, PATCH
from ..errors import CorruptPatchError, InvalidPatchError, WeightsMismatchError
from ..coding import patch_format as fmt
from ..coding.patch_format import RAW_BYTES
from ..coding.policy import codec_device
from ..coding.embedded import check_payload, configured_model, payload_for_file
from ..coding.registry import DEFAULT_MODEL, check_model_name, check_weights_id, resolve_model

if TYPE_CHECKING:  # the batch API (torch) is imported when a patch is coded: kept source tiles need none
    from ..coding.model_file import CodingModel


class WsiIdf(Codec):
    """Lossless Integer Discrete Flow codec for 80x80 RGB uint8 patches.

    Parameters
    ----------
    model : str
        A model name (``"fast"``, or a lab's own in the user models folder; see ``wsi-idf models``).
    weights : str, optional
        The sha256 of the model file. Stored in the array metadata; decoding refuses other
        weights. Defaults to the named model's weights, which are then embedded.
    embedded : dict, optional
        The model's coding tensors (``coding.embedded``), carried in the configuration so that the
        array decodes wherever wsi-idf is installed, whatever models that installation has. A codec
        made with ``weights=None`` embeds its model; configurations of wsi-idf 0.5 and older have none
        and decode with the package's own weights.
    archive : str, optional
        The id of the archive the array belongs to (32 hex digits): chunks are written in patch
        format 4, whose checksum covers it, so a chunk of another archive fails to decode.

    The network runs where ``WSI_IDF_DEVICE`` says (auto: the GPU when there is one); the
    bytes and pixels are the same on every device.

    An image codec, not a byte codec: a chunk is one (3, 80, 80) uint8 RGB patch, because the
    flow models 80x80 colour patches; anything else is refused (``InvalidPatchError``, a
    ``ValueError``), so numcodecs' byte-codec checks that encode arbitrary arrays do not apply.
    ``max_buffer_size`` bounds what ``decode`` accepts: no stored patch is larger.

    Examples
    --------
    >>> import numpy as np
    >>> codec = WsiIdf()
    >>> patch = np.full((3, 80, 80), 200, dtype=np.uint8)
    >>> encoded = codec.encode(patch)
    >>> len(encoded) < patch.nbytes
    True
    >>> bool((codec.decode(encoded).reshape(3, 80, 80) == patch).all())
    True
    """

    codec_id = "wsi_idf"
    max_buffer_size = fmt.RAW_BYTES + fmt.HEADER.size + fmt.POSITION.size  # the encoder never writes more

    def __init__(self, model: str = DEFAULT_MODEL, weights: str | None = None, archive: str | None = None,
                 embedded: dict | None = None):
        # the configuration may come from a hostile archive: only a name, a hex hash and a bounded
        # payload pass, and the model loads on first use, so opening an array never fails on it
        self.model = check_model_name(model)
        self._model: CodingModel | None = None  # runtime state, loaded on first use
        if weights is None:  # a new array: the named model's weights, carried along
            choice = resolve_model(model)
            weights, embedded = choice.sha256, payload_for_file(choice.path, choice.sha256)
        self.weights = check_weights_id(weights)
        self.embedded = None if embedded is None else check_payload(embedded)
        self.archive = check_archive_id(archive)

    @classmethod
    def from_model_file(cls, path, archive: str | None = None) -> "WsiIdf":
        """A codec for a model file given by path (a lab's own or an adapted one), its weights embedded."""
        choice = resolve_model(path)
        return cls(choice.name, choice.sha256, archive, payload_for_file(choice.path, choice.sha256))

    @property
    def _archive_id(self) -> bytes | None:
        return bytes.fromhex(self.archive) if self.archive else None

    @property
    def _coding_model(self) -> CodingModel:
        """The loaded model, pinned to the configured weights, on ``WSI_IDF_DEVICE``."""
        if self._model is None:
            self._model = configured_model(self.model, self.weights, self.embedded, str(codec_device()))
        return self._model

    def encode(self, buf) -> bytes:
        arr = ensure_contiguous_ndarray(buf)
        if arr.dtype != np.uint8 or arr.nbytes != RAW_BYTES:
            raise InvalidPatchError(f"wsi_idf chunks must be ({CHANNELS}, {PATCH}, {PATCH}) uint8, "
                                    f"got {arr.nbytes} bytes of {arr.dtype}")
        patch = arr.reshape(1, CHANNELS, PATCH, PATCH)
        from ..coding.batch import encode_patches
        return encode_patches(patch, model=self._coding_model, archive_id=self._archive_id)[0]

    def decode(self, buf, out=None):
        if out is not None and np.asarray(out).dtype == object:
            raise TypeError("wsi_idf decodes into uint8 buffers, not object arrays")
        data = bytes(ensure_contiguous_ndarray(buf)) if not isinstance(buf, bytes) else buf
        if len(data) > self.max_buffer_size:
            raise ValueError(f"a wsi_idf patch is at most {self.max_buffer_size} bytes, not {len(data)}: "
                             "not a chunk of this codec")
        patch = self.decode_many([data])[0]
        return ndarray_copy(patch, out) if out is not None else patch

    def encode_many(self, patches: np.ndarray) -> list[bytes]:
        """Encode (N, 3, 80, 80) uint8 patches in one batch."""
        from ..coding.batch import encode_patches
        return encode_patches(patches, model=self._coding_model, archive_id=self._archive_id)

    def decode_many(self, blobs: list[bytes], shape: tuple[int, ...] = (CHANNELS, PATCH, PATCH)) -> np.ndarray:
        """Decode many chunks of one ``shape`` in one batch: (N, *shape) uint8. Chunks that keep a
        slide's own tiles (``source_tiles``) need no model."""
        if any(len(b) > 3 and b[:2] == fmt.MAGIC and b[3] == fmt.Mode.SOURCE for b in blobs) \
                or tuple(shape) != (CHANNELS, PATCH, PATCH):
            from .source_tiles import decode_chunk
            return np.stack([decode_chunk(blob, tuple(shape), archive_id=self._archive_id) for blob in blobs]) if blobs else \
                np.empty((0, *shape), np.uint8)
        from ..coding.batch import DEFAULT_BATCH, decode_patches, on_cpu
        model = self._coding_model  # the array's own weights missing is not chunk damage
        # a GPU takes the whole request in one pass; CPU cores take it in batches side by side
        batch_size = DEFAULT_BATCH if on_cpu(model) else max(DEFAULT_BATCH, len(blobs))
        try:
            return decode_patches(blobs, model=model, batch_size=batch_size, archive_id=self._archive_id)
        except WeightsMismatchError as exc:
            # the array pins its weights, so a chunk naming others has a damaged header
            raise CorruptPatchError(f"a chunk names other weights than its array ({exc}): the chunk is "
                                    "damaged") from None

    def __reduce__(self):  # pickle the configuration, not the loaded model (Dask ships codecs to workers)
        return type(self), (self.model, self.weights, self.archive, self.embedded)

    def get_config(self) -> dict:
        config = {"id": self.codec_id, "model": self.model, "weights": self.weights}
        if self.archive:
            config["archive"] = self.archive
        if self.embedded is not None:
            config["embedded"] = self.embedded
        return config

    def __repr__(self) -> str:  # valid Python; the embedded tensors (~0.4 MB) are left out, so eval(repr(codec))
        # is the same decoder wherever the weights are installed
        archive = f", archive={self.archive!r}" if self.archive else ""
        return f"WsiIdf(model={self.model!r}, weights={self.weights!r}{archive})"


def check_archive_id(archive: object) -> str | None:
    """An archive id from a configuration (untrusted): None, or 32 lowercase hex digits."""
    if archive is None:
        return None
    if not isinstance(archive, str) or len(archive) != 32 or not set(archive) <= set("0123456789abcdef"):
        raise CorruptPatchError(f"archive id {str(archive)[:40]!r} is not 32 lowercase hex digits: the metadata "
                                "naming it is damaged")
    return archive
