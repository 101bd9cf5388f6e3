"""A lab's own models and models adapted to a slide: carried inside the arrays they coded, decoded
anywhere, exact like the shipped model, and never trusted from an archive without checks."""
from __future__ import annotations

import base64
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import int_reference
from slides import mosaic, pyramid, write_pyramidal_tiff
from wsi_idf.cli import main
from wsi_idf.coding.batch import decode_patches, encode_patches
from wsi_idf.coding.embedded import coding_bytes, load_embedded, payload_for_file
from wsi_idf.coding.registry import get_model, resolve_model, weights_file
from wsi_idf.errors import WsiIdfError
from wsi_idf.model.export import export_model, load_float_model
from wsi_idf.storage.zarr_codec import WsiIdfCodec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lab_model(tmp_path_factory) -> Path:
    """A lab's own model: the shipped float weights nudged (seeded), exported as ``lab-test``."""
    folder = tmp_path_factory.mktemp("user-models")
    model = load_float_model(weights_file("fast"))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 2e-3 * (param.abs().mean() + 1e-3))
    return export_model(model, folder, "lab-test")


@pytest.fixture()
def user_folder(lab_model, monkeypatch) -> Path:
    monkeypatch.setenv("WSI_IDF_MODELS", str(lab_model.parent))
    return lab_model.parent


def fresh_python(code: str, models: Path) -> str:
    """Run ``code`` in a new interpreter whose user models folder is ``models``."""
    env = dict(os.environ, WSI_IDF_MODELS=str(models))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_a_lab_model_is_another_model(lab_model):
    lab, shipped = get_model(lab_model), get_model("fast")
    assert lab.sha256 != shipped.sha256 and lab.name == "lab-test"
    assert resolve_model(str(lab_model)).sha256 == lab.sha256


def test_plain_zarr_decodes_an_array_of_a_lab_model_with_no_model_file_present(tmp_path, lab_model, val_patches):
    image = val_patches[:4].transpose(1, 0, 2, 3).reshape(3, 160, 160)
    store = tmp_path / "lab.zarr"
    array = zarr.create_array(str(store), shape=image.shape, chunks=(3, 80, 80), dtype="uint8", fill_value=0,
                              serializer=WsiIdfCodec.from_model_file(lab_model), compressors=None)
    array[:] = image
    np.save(tmp_path / "want.npy", image)
    code = (f"import numpy as np, zarr; a = zarr.open_array({str(store)!r}, mode='r'); "
            f"print(bool((a[:] == np.load({str(tmp_path / 'want.npy')!r})).all()), "
            "a.metadata.codecs[0].model)")
    assert fresh_python(code, tmp_path / "no-models").split() == ["True", "lab-test"]


def test_encode_patches_with_a_model_file_decodes_in_a_fresh_process_from_the_user_folder(tmp_path, lab_model,
                                                                                         val_patches):
    blobs = encode_patches(val_patches[:3], model=lab_model)
    np.save(tmp_path / "blobs.npy", np.array(blobs, dtype=object), allow_pickle=True)
    np.save(tmp_path / "want.npy", val_patches[:3])
    code = ("import numpy as np; from wsi_idf.coding.batch import decode_patches; "
            f"blobs = list(np.load({str(tmp_path / 'blobs.npy')!r}, allow_pickle=True)); "
            f"print(bool((decode_patches(blobs) == np.load({str(tmp_path / 'want.npy')!r})).all()))")
    assert fresh_python(code, lab_model.parent).strip() == "True"
    env = dict(os.environ, WSI_IDF_MODELS=str(tmp_path / "no-models"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode != 0 and "WeightsMismatchError" in done.stderr and "no-models" in done.stderr


def test_pack_with_a_model_file_carries_it_and_verifies_anywhere(tmp_path, lab_model, capsys):
    levels = pyramid(mosaic(480, 640, seed=11), 2)
    slide = write_pyramidal_tiff(tmp_path / "slide.tif", levels)
    archive = tmp_path / "slide.zarr"
    assert main(["pack", str(slide), "-o", str(archive), "--model", str(lab_model), "--scheduler", "synchronous",
                 "-q", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"] == "lab-test" and 2 * 200_000 < summary["model_bytes"] < 2 * 600_000  # two levels
    root = json.loads((archive / "zarr.json").read_text())["attributes"]["wsi_idf"]["model"]
    for level in ("0", "1"):
        config = json.loads((archive / level / "zarr.json").read_text())["codecs"][0]["configuration"]["codecs"][0][
            "configuration"]
        assert config["embedded"]["sha256"] == root["embedded"] and config["weights"] == root["weights"]
    code = ("from wsi_idf.cli import main; import sys; "
            f"sys.exit(main(['verify', {str(archive)!r}, '--source', {str(slide)!r}, '-q']))")
    fresh_python(code, tmp_path / "no-models")


def test_models_lists_user_models(user_folder, capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any(r["name"] == "lab-test" and "user model" in r["status"] for r in rows)
    assert resolve_model("lab-test").path.parent == user_folder


def test_a_lab_model_matches_the_int64_reference_on_any_batch_and_thread_count(lab_model, val_patches,
                                                                               hard_patches):
    model = get_model(lab_model)
    x = np.concatenate([val_patches[:3], hard_patches[:2]])
    outs, priors, top = model.flow.forward(torch.from_numpy(x))
    want = int_reference.forward_wavelet(str(model.path), x)
    np.testing.assert_array_equal(top.numpy().astype(np.int64), want[3])
    for got, expected in zip(outs, want[0]):
        np.testing.assert_array_equal(got.numpy().astype(np.int64), expected)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = encode_patches(x, model=model, batch_size=1)
    finally:
        torch.set_num_threads(threads)
    assert one == encode_patches(x, model=model, batch_size=64)
    embedded = load_embedded(payload_for_file(lab_model, model.sha256), model.sha256)
    assert np.array_equal(decode_patches(one, model=embedded), x)  # the carried tensors are the same model


# --- an archive's payload is never trusted ------------------------------------------------------------------

def forged(payload: dict, data: bytes, size: int | None = None) -> dict:
    """A payload a hostile archive could write: consistent hashes around ``data``."""
    import hashlib
    return {**payload, "data": base64.b64encode(lzma.compress(data)).decode(), "size": size or len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def test_damaged_or_forged_payloads_are_refused_in_one_line(lab_model):
    from safetensors.numpy import load, save
    sha = get_model(lab_model).sha256
    payload = payload_for_file(lab_model, sha)
    data = coding_bytes(payload)
    flipped = dict(payload, data=payload["data"][:1000] + ("A" if payload["data"][1000] != "A" else "B")
                   + payload["data"][1001:])
    # (the bytes are checked when first loaded; a process caches a model by its hash, so these check the bytes)
    with pytest.raises(WsiIdfError, match="damaged"):
        coding_bytes(flipped)
    with pytest.raises(WsiIdfError, match="claims"):
        coding_bytes(dict(payload, size=2**40))
    bomb = forged(payload, b"\0" * (64 * 2**20))  # 10 KB of xz claiming 1000 bytes
    with pytest.raises(WsiIdfError, match="not the 1000 bytes"):
        coding_bytes(dict(bomb, size=1000))
    with pytest.raises(WsiIdfError, match="other weights|not 0000"):
        load_embedded(payload, "0" * 64)
    # a clamp that would index past the tables, with hashes forged to match
    import json as _json
    header = _json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    tensors = load(data)
    tensors["prior.0.3.hi"] = tensors["prior.0.3.hi"] + 100
    with pytest.raises(WsiIdfError, match="clamps outside"):
        load_embedded(forged(payload, save(tensors, metadata=header)), sha)
    with pytest.raises(WsiIdfError, match="not a safetensors|valid wsi-idf model|too short"):
        load_embedded(forged(payload, b"not a model at all"), sha)


def test_a_forged_payload_in_an_archive_fails_with_one_message(tmp_path, lab_model, capsys):
    levels = pyramid(mosaic(240, 320, seed=12), 1)
    slide = write_pyramidal_tiff(tmp_path / "slide.tif", levels)
    archive = tmp_path / "slide.zarr"
    assert main(["pack", str(slide), "-o", str(archive), "--model", str(lab_model), "--scheduler", "synchronous",
                 "-q"]) == 0
    level = json.loads((archive / "0" / "zarr.json").read_text())
    config = level["codecs"][0]["configuration"]["codecs"][0]["configuration"]
    config["embedded"]["data"] = config["embedded"]["data"][::-1]
    (archive / "0" / "zarr.json").write_text(json.dumps(level))
    assert main(["verify", str(archive), "-q"]) == 3  # in this process the model is cached: verify reads it again
    assert "level 0's model" in capsys.readouterr().err
    region = ("from wsi_idf.cli import main; import sys; sys.exit(main(['region', sys.argv[1], '--x', '0', '--y', "
              "'0', '--width', '80', '--height', '80', '-o', sys.argv[2]]))")
    env = dict(os.environ, WSI_IDF_MODELS=str(tmp_path / "no-models"))
    done = subprocess.run([sys.executable, "-c", region, str(archive), str(tmp_path / "r.png")], env=env,
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "damaged" in done.stderr
    assert not (tmp_path / "r.png").exists()
    plain = f"import zarr; zarr.open_array({str(archive / '0')!r}, mode='r')[:, :80, :80]"
    done = subprocess.run([sys.executable, "-c", plain], env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode != 0 and "embedded model" in done.stderr


# --- adapting the model to the slide --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lossless_slide(tmp_path_factory) -> Path:
    """A 960x1280 two-level lossless pyramid of real tissue: every level IDF-coded."""
    folder = tmp_path_factory.mktemp("adapt")
    return write_pyramidal_tiff(folder / "slide.tif", pyramid(mosaic(960, 1280, seed=21), 2))


def test_adapt_steps_is_deterministic_carried_and_reported(tmp_path, lossless_slide, capsys):
    from wsi_idf.jobs.pack import pack_slide
    first = pack_slide(lossless_slide, tmp_path / "a.zarr", adapt_steps=4, adapt_seed=3, scheduler="synchronous")
    second = pack_slide(lossless_slide, tmp_path / "b.zarr", adapt_steps=4, adapt_seed=3, scheduler="synchronous")
    meta = [json.loads((tmp_path / f"{n}.zarr" / "zarr.json").read_text())["attributes"]["wsi_idf"]["model"]
            for n in "ab"]
    assert meta[0]["weights"] == meta[1]["weights"] and meta[0]["adaptation"] == {**meta[1]["adaptation"],
                                                                                 "seconds": meta[0]["adaptation"]["seconds"]}
    adaptation = first["adaptation"]
    assert adaptation["steps"] == 4 and adaptation["heldout_patches"] > 0 and adaptation["seed"] == 3
    assert (meta[0]["name"] == "fast-adapted") == (adaptation["kept"] == "adapted")
    assert (adaptation["adapted_bpsp"] < adaptation["base_bpsp"]) == (adaptation["kept"] == "adapted")
    assert meta[0]["base"]["name"] == "fast"
    assert main(["info", str(tmp_path / "a.zarr")]) == 0
    out = capsys.readouterr().out
    assert "adapt     4 steps" in out and "held-out patches" in out and "% of the archive" in out
    code = ("from wsi_idf.cli import main; import sys; "
            f"sys.exit(main(['verify', {str(tmp_path / 'a.zarr')!r}, '--source', {str(lossless_slide)!r}, '-q']))")
    fresh_python(code, tmp_path / "no-models")
    assert second["adaptation"]["kept"] == adaptation["kept"]


def test_adaptation_regions_sit_on_the_grid_the_level_is_coded_on(lossless_slide):
    """Adaptation learns the phase it codes: every region is made of the level's own grid patches."""
    from wsi_idf.model.adapt import slide_regions
    from wsi_idf.model.data import grid_patches
    from wsi_idf.slide import open_slide
    with open_slide(lossless_slide) as slide:
        for level in range(len(slide.levels)):
            lv = slide.levels[level]
            coded = {p.tobytes() for p in grid_patches([slide.read(level, 0, lv.height, 0, lv.width)])}
            regions = slide_regions(slide, [level], 4, np.random.default_rng(level))
            assert regions and all(p.tobytes() in coded for p in grid_patches(regions))


def test_a_resumed_adapted_pack_reuses_the_adapted_weights(tmp_path, lossless_slide):
    from wsi_idf.coding.registry import resolve_model
    from wsi_idf.jobs.pack import adapted_model, plan_layouts
    from wsi_idf.slide import open_slide
    root = tmp_path / "x.zarr.partial"
    settings = {"budget": None, "steps": 3, "seed": 0}
    with open_slide(lossless_slide) as slide:
        layouts = plan_layouts(slide, "auto", 1280, 3)
        chosen, record = adapted_model(root, slide, layouts, resolve_model("fast"), settings, "cpu")
        record_file = root / ".wsi-idf-pack" / "model" / "adaptation.json"
        stamp = record_file.stat().st_mtime_ns
        again, record_again = adapted_model(root, slide, layouts, resolve_model("fast"), settings, "cpu")
    assert record_file.stat().st_mtime_ns == stamp and record_again == record  # nothing was trained again
    assert again.sha256 == chosen.sha256


def test_adapt_auto_skips_a_small_slide(tmp_path, lossless_slide):
    from wsi_idf.jobs.pack import pack_slide
    from wsi_idf.model.adapt import auto_minutes
    summary = pack_slide(lossless_slide, tmp_path / "a.zarr", adapt="auto", scheduler="synchronous")
    assert summary["model"] == "fast" and "too small" in summary["adaptation"]["skipped"]
    assert auto_minutes(10**7) == 0 and auto_minutes(2 * 10**8) == 2 and auto_minutes(10**10) == 10


def test_train_on_slides_without_val_holds_out_rows_and_reports_before_and_after(tmp_path, capsys, monkeypatch,
                                                                                 lossless_slide):
    monkeypatch.setenv("WSI_IDF_MODELS", str(tmp_path / "models"))
    assert main(["train", "lab-slides", "--init-from", "fast", "--data", str(lossless_slide), "--steps", "2",
                 "--eval-every", "2", "--out", str(tmp_path / "ckpt"), "--json", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["val_source"] == "held-out slide rows" and summary["val_bpsp_before"] > 0
    assert Path(summary["model"]).parent == tmp_path / "models"
    assert main(["models", "--json"]) == 0
    assert any(r["name"] == "lab-slides" for r in json.loads(capsys.readouterr().out))


def test_the_adapted_fixture_of_wsi_idf_0_6_decodes_in_a_fresh_process_from_its_own_bytes(tmp_path):
    """``fast-adapted`` exists nowhere but inside the archive (tests/fixtures/make_archive_fixtures.py 4)."""
    fixture = REPO / "tests" / "fixtures" / "archive_v4_adapted.zarr"
    meta = json.loads((fixture / "zarr.json").read_text())["attributes"]["wsi_idf"]
    assert meta["model"]["name"] == "fast-adapted" and meta["format_version"] == 4
    code = ("import sys, zarr, numpy as np, hashlib; from wsi_idf import open_archive; "
            f"a = zarr.open_group({str(fixture)!r}, mode='r'); x = a['0'][...]; "
            f"b = open_archive({str(fixture)!r}); "
            "print(bool((b.region(0, 0, 0, x.shape[2], x.shape[1]) == x.transpose(1, 2, 0)).all()), "
            "b.readers[0].model.name)")
    assert fresh_python(code, tmp_path / "no-models").split() == ["True", "fast-adapted"]


def test_a_lab_model_writes_within_one_percent_of_its_nll(lab_model, val_patches):
    from wsi_idf.coding import patch_format as fmt
    from wsi_idf.coding.batch import ideal_bits
    blobs = encode_patches(val_patches, model=lab_model, jxl_effort=None)
    payload = sum(len(b) - fmt.unpack(b)[0].size for b in blobs)
    assert payload <= 1.01 * ideal_bits(val_patches, model=lab_model).sum() / 8 + 4 * len(blobs)
