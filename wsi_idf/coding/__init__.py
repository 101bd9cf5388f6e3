"""Exact coding of 80x80 patches: the integer flow, model files and their registry, the entropy
model (push and pop), the per-patch byte format, and the batch API.

Everything here is integer arithmetic, bit-exact on every machine; it never imports the float
training models (``wsi_idf.model``).
"""
from .batch import decode_patches, encode_patches, ideal_bits

__all__ = ["encode_patches", "decode_patches", "ideal_bits"]
