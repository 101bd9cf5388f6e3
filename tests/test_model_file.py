"""Model files: safetensors only, hash-named and hash-checked, deterministic export."""
from __future__ import annotations

import shutil

import pytest

from wsi_idf import WeightsMismatchError, WsiIdfError
from wsi_idf.digests import file_sha256
from wsi_idf.model.export import export_model, load_float_model
from wsi_idf.coding.model_file import load_coding_model
from wsi_idf.config import IDFConfig
from wsi_idf.coding.registry import MODELS, RETIRED, WEIGHTS_DIR

SHIPPED = {e.weights: e for e in (*MODELS.values(), *RETIRED)}


@pytest.mark.parametrize("weights", sorted(SHIPPED))
def test_shipped_files_match_their_names(weights):
    path = WEIGHTS_DIR / weights
    assert file_sha256(path).startswith(path.stem.rsplit("-", 1)[1])
    model = load_coding_model(path)
    assert model.config == SHIPPED[weights].config and model.name == SHIPPED[weights].name


def test_every_weight_file_is_in_the_registry():
    """A file in wsi_idf/weights that no entry names would be shipped but never tested."""
    assert {p.name for p in WEIGHTS_DIR.glob("*.safetensors")} == set(SHIPPED)


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
    """Re-exporting the shipped float weights of model v2 reproduces its file byte for byte, on any machine."""
    src = WEIGHTS_DIR / MODELS["fast"].weights
    path = export_model(load_float_model(src), tmp_path, "fast")
    assert path.name == src.name


def test_v1_export_differs_at_most_by_float_ties(tmp_path):
    """Model v1 tables gave each row's rounding remainder to the float argmax, which a symmetric row
    decides by the last bit of tanh (AVX-512 machines differ): a re-export may swap those two
    frequencies and nothing else. Decoding never re-exports: it reads the tables from the file."""
    import numpy as np
    from safetensors.numpy import load_file
    src = WEIGHTS_DIR / next(e for e in RETIRED if isinstance(e.config, IDFConfig)).weights  # a v1 file
    path = export_model(load_float_model(src), tmp_path / "a", "fast")
    assert path.read_bytes() == export_model(load_float_model(src), tmp_path / "b", "fast").read_bytes()
    shipped, again = load_file(str(src)), load_file(str(path))
    assert shipped.keys() == again.keys()
    for key in shipped:
        if key != "split_freq":
            np.testing.assert_array_equal(shipped[key], again[key], err_msg=key)
    rows, cols = np.nonzero(shipped["split_freq"] != again["split_freq"])
    for row in set(rows.tolist()):
        a, b = shipped["split_freq"][row], again["split_freq"][row]
        assert sorted(cols[rows == row].tolist()) == [127, 128] and (a[127], a[128]) == (b[128], b[127])


def test_v2_tables_break_ties_by_integers():
    """A symmetric row (mean fraction 1/2) gives its rounding remainder to the first of its two equal
    modes, whatever the last bit of tanh on this machine (model v1 tables keep their float argmax)."""
    import numpy as np
    from wsi_idf.config import MEAN_STEPS, SPLIT_WINDOW
    from wsi_idf.model.tables import split_table
    table = split_table(deterministic=True)
    half = table[np.arange(table.shape[0]) % MEAN_STEPS == MEAN_STEPS // 2]
    left, right = half[:, SPLIT_WINDOW], half[:, SPLIT_WINDOW + 1]
    assert (left >= right).all()
