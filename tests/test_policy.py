"""The execution policy has one owner (``wsi_idf.coding.policy``): device, cores, batch sizes."""
from __future__ import annotations

import pytest

from wsi_idf.coding import policy, registry


def test_the_registry_keeps_only_the_model_table():
    for name in ("require_device", "codec_device", "DEVICE_ENV", "usable_cores"):
        assert not hasattr(registry, name), name
    assert registry.default_device is policy.default_device  # used by get_model, decided by the policy


def test_batch_sizes_and_slots_follow_the_device_and_the_cores(monkeypatch):
    assert policy.encode_batch_size("cpu") == policy.CPU_ENCODE_BATCH
    assert policy.encode_batch_size("cuda:0") == policy.GPU_ENCODE_BATCH
    monkeypatch.setenv(policy.DEVICE_ENV, " CPU ")
    assert policy.device_setting() == "cpu" and policy.decode_batch_size() == policy.CPU_DECODE_BATCH
    monkeypatch.setenv(policy.DEVICE_ENV, "cuda:1")
    assert policy.gpu_decodes() and policy.decode_batch_size() == policy.GPU_DECODE_BATCH
    assert 1 <= policy.decode_slots() == min(policy.MAX_DECODE_SLOTS, policy.usable_cores())


def test_an_unknown_or_absent_device_is_one_clear_error(monkeypatch):
    from wsi_idf.errors import WsiIdfError
    with pytest.raises(WsiIdfError, match="unknown device"):
        policy.require_device("tpu")
    monkeypatch.setenv(policy.DEVICE_ENV, "nonsense")
    with pytest.raises(WsiIdfError, match="WSI_IDF_DEVICE='nonsense'"):
        policy.codec_device()


def test_source_lossy_has_one_definition():
    """pack's summary and info both take ``archive.metadata.source_lossy`` (they used to disagree)."""
    from wsi_idf.archive.metadata import source_lossy
    jpeg = {"source": {"decoder": {"compression": "JPEG"}, "backend": "tifffile"}, "slide": {"vendor": "aperio"}}
    zlib = {"source": {"decoder": {"compression": "ADOBE_DEFLATE"}, "backend": "tifffile"}, "slide": {"vendor": "tiff"}}
    mrxs = {"source": {"decoder": {}, "backend": "openslide"}, "slide": {"vendor": "mirax"}}
    assert [source_lossy(m) for m in (jpeg, zlib, mrxs)] == [True, False, True]
