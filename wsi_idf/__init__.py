"""wsi-idf: lossless whole-slide image archiving with Integer Discrete Flows."""
from .coding import decode_patches, encode_patches, ideal_bits
from .errors import (CorruptPatchError, InvalidPatchError, UnknownModelError, WeightsMismatchError, WsiIdfError)
from .registry import DEFAULT_MODEL, MODELS, get_model

__version__ = "0.1.0"

__all__ = ["encode_patches", "decode_patches", "ideal_bits", "get_model", "MODELS", "DEFAULT_MODEL",
           "WsiIdfError", "CorruptPatchError", "InvalidPatchError", "UnknownModelError", "WeightsMismatchError",
           "__version__"]
