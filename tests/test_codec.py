"""The wsi_idf Zarr codecs: config, numcodecs registry, v3 sharded and v2 arrays, plain-zarr reads."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numcodecs
import numpy as np
import pytest
import zarr

from wsi_idf import WeightsMismatchError
from wsi_idf.errors import UnknownModelError, WsiIdfError
from wsi_idf.storage.numcodecs_codec import WsiIdf
from wsi_idf.coding.registry import DEFAULT_MODEL, get_model
from wsi_idf.storage.zarr_codec import WsiIdfCodec


@pytest.fixture(scope="module")
def region(val_patches) -> np.ndarray:
    """A (3, 170, 250) real-pixel image (odd size: zarr pads the edge chunks)."""
    grid = val_patches[:9].reshape(3, 3, 3, 80, 80).transpose(2, 0, 3, 1, 4).reshape(3, 240, 240)
    return np.ascontiguousarray(np.concatenate([grid, grid[:, :, :10]], axis=2)[:, :170])


def test_get_codec_gives_default_model_and_config_roundtrips():
    codec = numcodecs.get_codec({"id": "wsi_idf"})
    assert isinstance(codec, WsiIdf) and codec.model == DEFAULT_MODEL
    config = codec.get_config()
    embedded = config.pop("embedded")  # a new codec carries its model's tensors
    assert config == {"id": "wsi_idf", "model": DEFAULT_MODEL, "weights": get_model().sha256}
    assert embedded["format"] == "safetensors+xz+base64" and 200_000 < len(embedded["data"]) < 600_000
    assert numcodecs.get_codec({**config, "embedded": embedded}) == codec
    v3 = WsiIdfCodec.from_dict(WsiIdfCodec().to_dict())
    assert v3 == WsiIdfCodec() and v3.to_dict()["configuration"]["weights"] == get_model().sha256


def test_config_with_other_weights_refuses_on_use(val_patches):
    blob = WsiIdf().encode(val_patches[0])
    with pytest.raises(WeightsMismatchError):
        numcodecs.get_codec({"id": "wsi_idf", "model": "fast", "weights": "0" * 64}).decode(blob)
    with pytest.raises(WeightsMismatchError):
        WsiIdfCodec.from_dict({"name": "wsi_idf", "configuration": {"model": "fast", "weights": "f" * 64}})._codec._coding_model



def test_the_codec_device_comes_from_wsi_idf_device(val_patches, monkeypatch):
    """Plain zarr passes no device: WSI_IDF_DEVICE chooses (auto: the GPU when present); a bad value
    is one clear error, and the bytes do not depend on it."""
    import torch
    blob = WsiIdf().encode(val_patches[0])
    monkeypatch.setenv("WSI_IDF_DEVICE", "cpu")
    codec = WsiIdf()
    assert np.array_equal(codec.decode(blob).reshape(3, 80, 80), val_patches[0])
    assert codec._coding_model.flow.device == torch.device("cpu")
    monkeypatch.setenv("WSI_IDF_DEVICE", "abacus")
    with pytest.raises(WsiIdfError, match="WSI_IDF_DEVICE='abacus': unknown device"):
        WsiIdf().decode(blob)
    if not torch.cuda.is_available():
        monkeypatch.setenv("WSI_IDF_DEVICE", "cuda")
        with pytest.raises(WsiIdfError, match="no CUDA device"):
            WsiIdf().decode(blob)

HOSTILE_MODELS = ["/tmp/planted-01b41279.safetensors", "../../../tmp/planted", "**", "fast/../max", "", None, 7,
                  "fast-01b41279.safetensors", "x" * 5000]


@pytest.mark.parametrize("model", HOSTILE_MODELS)
def test_a_codec_config_never_names_a_path(model):
    """Archive metadata may be hostile: a model value is a registered name or nothing loads."""
    with pytest.raises(UnknownModelError, match="unknown model"):
        numcodecs.get_codec({"id": "wsi_idf", "model": model, "weights": "01b41279"})
    with pytest.raises(UnknownModelError, match="unknown model"):
        WsiIdfCodec.from_dict({"name": "wsi_idf", "configuration": {"model": model, "weights": "01b41279"}})


@pytest.mark.parametrize("weights", ["../../x", "*", "01B41279", "0123", "g" * 64, None, 12, "a" * 65])
def test_codec_weights_are_hex_only(weights):
    config = {"id": "wsi_idf", "model": "fast", "weights": weights}
    if weights is None:  # no weights: the installed ones
        assert numcodecs.get_codec(config).weights == get_model().sha256
        return
    with pytest.raises(WeightsMismatchError, match="not a sha256"):
        numcodecs.get_codec(config)


def test_model_files_must_be_regular_and_bounded(tmp_path):
    """A link to /dev/zero (endless) or a huge file is never hashed: refused at once."""
    link = tmp_path / "fast-01b41279.safetensors"
    link.symlink_to("/dev/zero")
    with pytest.raises(WsiIdfError, match="not a regular file"):
        get_model(link)
    big = tmp_path / "fast-00000000.safetensors"
    with open(big, "wb") as f:
        f.truncate(300 * 2**20)  # sparse: no disk used
    with pytest.raises(WsiIdfError, match="more than a model file may"):
        get_model(big)


def test_numcodecs_roundtrip(val_patches):
    codec = WsiIdf()
    enc = codec.encode(val_patches[0])
    np.testing.assert_array_equal(codec.decode(enc).reshape(3, 80, 80), val_patches[0])
    out = np.empty((3, 80, 80), np.uint8)
    codec.decode(enc, out=out)
    np.testing.assert_array_equal(out, val_patches[0])


def write_v3(path, data):
    arr = zarr.create_array(str(path), shape=data.shape, dtype="uint8", chunks=(3, 80, 80), shards=(3, 160, 160),
                            serializer=WsiIdfCodec(), compressors=None, fill_value=0, dimension_names=("c", "y", "x"))
    arr[:] = data
    return arr


def write_v2(path, data):
    arr = zarr.create_array(str(path), shape=data.shape, dtype="uint8", chunks=(3, 80, 80), zarr_format=2,
                            compressors=[WsiIdf()], filters=None, fill_value=0)
    arr[:] = data
    return arr


@pytest.mark.parametrize("write", [write_v3, write_v2])
def test_zarr_array_roundtrip_and_regions(tmp_path, region, write):
    write(tmp_path / "a.zarr", region)
    arr = zarr.open_array(str(tmp_path / "a.zarr"), mode="r")
    np.testing.assert_array_equal(arr[:], region)
    np.testing.assert_array_equal(arr[:, 75:165, 3:247], region[:, 75:165, 3:247])
    np.testing.assert_array_equal(arr[1, 169, 249], region[1, 169, 249])


@pytest.mark.parametrize("write", [write_v3, write_v2])
def test_plain_zarr_reads_without_importing_wsi_idf(tmp_path, region, write):
    write(tmp_path / "a.zarr", region)
    np.save(tmp_path / "want.npy", region[:, 10:150, 20:200])
    code = f"""
import sys, numpy as np, zarr
arr = zarr.open_array({str(tmp_path / 'a.zarr')!r}, mode='r')
assert (arr[:, 10:150, 20:200] == np.load({str(tmp_path / 'want.npy')!r})).all()
print('ok')
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_v3_rejects_wrong_chunk_shape(tmp_path):
    arr = zarr.create_array(str(tmp_path / "b.zarr"), shape=(3, 64, 64), dtype="uint8", chunks=(3, 64, 64),
                            serializer=WsiIdfCodec(), compressors=None, fill_value=0)
    with pytest.raises(Exception, match="chunks"):
        arr[:] = np.ones((3, 64, 64), np.uint8)


def test_concurrent_decode_is_thread_safe(val_patches):
    codec = WsiIdf()
    blobs = [codec.encode(p) for p in val_patches[:12]]
    with ThreadPoolExecutor(4) as pool:
        decoded = list(pool.map(lambda b: codec.decode(b).reshape(3, 80, 80), blobs * 3))
    for i, d in enumerate(decoded):
        np.testing.assert_array_equal(d, val_patches[i % 12])


def test_damaged_chunk_in_shard_raises_and_neighbours_still_read(tmp_path, region):
    from wsi_idf import CorruptPatchError
    write_v3(tmp_path / "a.zarr", region)
    shard = tmp_path / "a.zarr" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x40  # inside the first inner chunk (the index sits at the end)
    shard.write_bytes(bytes(data))
    arr = zarr.open_array(str(tmp_path / "a.zarr"), mode="r")
    with pytest.raises(CorruptPatchError):
        arr[:, :80, :80]
    np.testing.assert_array_equal(arr[:, 80:160, 80:160], region[:, 80:160, 80:160])


@pytest.mark.parametrize("device,batch", [("cpu", 16), ("cuda", 256), ("cuda:1", 256), (" CPU ", 16)])
def test_zarr_batch_follows_the_decoding_device_without_torch(device, batch):
    """16 patches per codec call on CPU, 256 where a GPU decodes, set when the first array with the
    codec is opened (not when the codec is looked up or imported); choosing never imports torch."""
    code = ("import sys, zarr; from zarr.registry import get_codec_class; codec = get_codec_class('wsi_idf'); "
            "from wsi_idf.coding.registry import entry; weights = entry('fast').weights.split('-')[1][:8]; "
            "print(zarr.config.get('codec_pipeline.batch_size')); codec(model='fast', weights=weights); "
            "print(zarr.config.get('codec_pipeline.batch_size'), 'torch' in sys.modules)")
    env = dict(os.environ, WSI_IDF_DEVICE=device)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", str(batch), "False"]


def test_codecs_pickle_as_configuration():
    import pickle
    for codec in (WsiIdf(), WsiIdfCodec()):
        data = pickle.dumps(codec)  # the configuration, embedded tensors included
        assert len(data) < 1000 + len(codec.embedded["data"]) and pickle.loads(data) == codec


def test_zarr_batches_chunks_through_the_codec(tmp_path, val_patches):
    """zarr passes a batch of chunks per codec call once wsi_idf's codec is loaded; results equal one at a time."""
    import zarr
    from wsi_idf.storage.zarr_codec import WsiIdfCodec, decode_batch_size
    WsiIdfCodec()  # the first array with the codec raises zarr's batch from its default
    assert zarr.config.get("codec_pipeline.batch_size") == decode_batch_size()
    image = val_patches[:16].reshape(4, 4, 3, 80, 80).transpose(2, 0, 3, 1, 4).reshape(3, 320, 320)
    arr = zarr.create_array(str(tmp_path / "b.zarr"), shape=image.shape, dtype="uint8", chunks=(3, 80, 80),
                            shards=(3, 320, 320), serializer=WsiIdfCodec(), compressors=None, fill_value=0)
    arr[:] = image
    with zarr.config.set({"codec_pipeline.batch_size": 1}):
        one_at_a_time = zarr.open_array(str(tmp_path / "b.zarr"), mode="r")[:, 7:301, 13:]
    assert np.array_equal(one_at_a_time, image[:, 7:301, 13:])
    assert np.array_equal(zarr.open_array(str(tmp_path / "b.zarr"), mode="r")[...], image)


def test_numcodecs_own_checks_that_apply_to_an_image_codec(val_patches):
    """numcodecs' codec checks (``numcodecs.tests.common``) where they fit an image codec: the config
    round-trips, the repr is the instantiation statement, object buffers are refused with TypeError,
    and decode refuses a buffer larger than any patch (``max_buffer_size``). The byte-codec checks
    that encode arbitrary arrays (check_encode_decode, check_max_buffer_size) do not apply: a chunk
    is one (3, 80, 80) uint8 patch, and anything else raises InvalidPatchError (a ValueError)."""
    from numcodecs.tests.common import check_config, check_err_encode_object_buffer
    codec = WsiIdf()
    check_config(codec)
    check_err_encode_object_buffer(codec)
    for made in (codec, WsiIdf(archive="0123456789abcdef0123456789abcdef")):
        stmt = repr(made)
        assert repr(eval(stmt, {"WsiIdf": WsiIdf})) == stmt  # check_repr, with the class in scope
    encoded = codec.encode(val_patches[0])
    with pytest.raises(TypeError):  # check_err_decode_object_buffer, with a patch
        codec.decode(encoded, out=np.empty(val_patches[0].size, dtype=object))
    with pytest.raises(ValueError):
        codec.decode(b"x" * (codec.max_buffer_size + 1))
    with pytest.raises(ValueError):
        codec.encode(np.zeros(10, dtype=np.int8))
    assert np.array_equal(codec.decode(encoded).reshape(val_patches[0].shape), val_patches[0])
