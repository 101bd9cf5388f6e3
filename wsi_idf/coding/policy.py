"""The execution policy, decided in one place: which device codes, how many cores a process may use,
and how many patches go through the network at once. Nothing here imports torch until a device
object is asked for, so kept-tile reads and zarr's codec set-up stay light.

Measured choices (README "Region reads", ``coding.threads``): 64 patches per encode batch on CPU
and 256 on a GPU; zarr hands the codec 16 patches per call on CPU (as fast as 64 now that batches
run side by side, at half the memory) and 256 where a GPU decodes; at most min(4, cores) decode
calls in flight per process.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import WsiIdfError

if TYPE_CHECKING:
    import torch

DEVICE_ENV = "WSI_IDF_DEVICE"
CPU_ENCODE_BATCH, GPU_ENCODE_BATCH = 64, 256
CPU_DECODE_BATCH, GPU_DECODE_BATCH = 16, 256
MAX_DECODE_SLOTS = 4


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. under taskset or a batch scheduler)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def device_setting() -> str:
    """``WSI_IDF_DEVICE`` as given (auto, cpu, cuda, cuda:1; default auto), lower-cased."""
    return os.environ.get(DEVICE_ENV, "auto").strip().lower() or "auto"


def gpu_decodes() -> bool:
    """Whether the codec will decode on a GPU, decided without importing torch: the setting names
    CUDA, or says auto on a machine with an NVIDIA driver."""
    device = device_setting()
    return device.startswith("cuda") or (device == "auto" and os.path.exists("/dev/nvidiactl"))


def decode_batch_size() -> int:
    """Patches per zarr codec call."""
    return GPU_DECODE_BATCH if gpu_decodes() else CPU_DECODE_BATCH


def encode_batch_size(device: str) -> int:
    """Patches in the network at once when a pack task encodes on ``device``."""
    return CPU_ENCODE_BATCH if str(device) == "cpu" else GPU_ENCODE_BATCH


def decode_slots() -> int:
    """Decode calls in flight at once per process (zarr's concurrent chunk batches, a server's tiles)."""
    return max(1, min(MAX_DECODE_SLOTS, usable_cores()))


def default_device(device: str | torch.device | None) -> torch.device:
    """The one place "auto" (or None) becomes a device: CUDA when this machine has it."""
    import torch
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def require_device(device: str | torch.device) -> torch.device:
    """A device that exists on this machine; a clear error otherwise (before any work starts)."""
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise WsiIdfError(f"unknown device {device!r}: use cpu, cuda or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WsiIdfError(f"device {device!r}: this machine has no CUDA device; use --device cpu (or auto)")
    return dev


def codec_device() -> torch.device:
    """Where the zarr codecs run the network: ``WSI_IDF_DEVICE`` (default auto: the GPU when there
    is one). Plain ``zarr.open`` passes no device, so this is how to choose."""
    value = os.environ.get(DEVICE_ENV, "auto").strip() or "auto"
    if value == "auto":
        return default_device(value)
    try:
        return require_device(value)
    except WsiIdfError as exc:
        raise WsiIdfError(f"{DEVICE_ENV}={value!r}: {exc}") from None
