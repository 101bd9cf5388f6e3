"""Model files: safetensors only, hash-named and hash-checked, deterministic export."""
from __future__ import annotations

import shutil

import pytest

from wsi_idf import WeightsMismatchError, WsiIdfError
from wsi_idf.model_file import export_model, file_sha256, load_coding_model, load_float_model
from wsi_idf.registry import MODELS, WEIGHTS_DIR


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shipped_files_match_their_names(name):
    path = WEIGHTS_DIR / MODELS[name].weights
    assert file_sha256(path).startswith(path.stem.rsplit("-", 1)[1])
    model = load_coding_model(path)
    assert model.config == MODELS[name].config and model.name == name


def test_altered_file_is_refused(tmp_path):
    src = WEIGHTS_DIR / MODELS["fast"].weights
    dst = tmp_path / src.name
    shutil.copy(src, dst)
    data = bytearray(dst.read_bytes())
    data[-100] ^= 0xFF
    dst.write_bytes(bytes(data))
    with pytest.raises(WeightsMismatchError, match="damaged or altered"):
        load_coding_model(dst)


def test_not_a_model_file_is_refused(tmp_path):
    bogus = tmp_path / "fast-00000000.safetensors"
    bogus.write_bytes(b"not a model")
    with pytest.raises(WsiIdfError):
        load_coding_model(bogus)


def test_export_is_deterministic(tmp_path):
    """Re-exporting the shipped float weights reproduces the shipped file byte for byte."""
    src = WEIGHTS_DIR / MODELS["fast"].weights
    path = export_model(load_float_model(src), tmp_path, "fast")
    assert path.name == src.name
