"""The wsi-idf command line, run in process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import DATA, NO_DATA
from wsi_idf.cli import main


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(r["installed"] for r in rows)
    from wsi_idf.coding.registry import DEFAULT_MODEL, MODELS, RETIRED
    registered = [r for r in rows if r["status"] == "registered"]
    assert [r["name"] for r in registered if r["default"]] == [DEFAULT_MODEL]
    assert all(r["measured"]["val_bpsp"] > 0 and r["measured"]["decode_mpx_s"] > 0 for r in registered)
    assert [r["weights"] for r in rows] == [e.weights for e in (*MODELS.values(), *RETIRED)]  # retired ones listed


def test_models_table_prints_numbers_not_adjectives(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "bits/sub-pixel" in out and "decode Mpx/s" in out and "retired" in out


def test_demo_json(capsys):
    if not (DATA / "tiles" / "val").is_dir():
        pytest.skip(NO_DATA)
    assert main(["demo", "--count", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["lossless"] and summary["patches"] == 4 and summary["ratio"] > 1


def test_unknown_model_is_one_clear_line(capsys):
    if not (DATA / "tiles" / "val").is_dir():
        pytest.skip(NO_DATA)
    assert main(["demo", "--count", "2", "--model", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("wsi-idf: error: unknown model 'nope'") and "Traceback" not in err


def test_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "exit codes" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory):
    if not (DATA / "tiles").is_dir():
        pytest.skip(NO_DATA)
    from slides import mosaic, write_pyramidal_tiff
    folder = tmp_path_factory.mktemp("cli")
    source = write_pyramidal_tiff(folder / "a.tif", [mosaic(160, 240, seed=5)])
    other = write_pyramidal_tiff(folder / "b.tif", [mosaic(240, 160, seed=6)])
    assert main(["pack", str(source), "-o", str(folder / "a.zarr"), "--scheduler", "synchronous", "-q"]) == 0
    return source, other, folder / "a.zarr"


def one_line(capsys, code: int, argv: list[str], words: str) -> None:
    if code == 2:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    else:
        assert main(argv) == code
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err


def test_wrong_arguments_get_one_clear_line(small_archive, tmp_path, capsys):
    import torch
    source, other, archive = small_archive
    out = tmp_path / "x.zarr"
    one_line(capsys, 1, ["pack", str(source), "-o", str(out), "--shard", "1000000"], "from 80 to 5120")
    one_line(capsys, 2, ["pack", str(source), "-o", str(out), "--workers", "0"], "must be at least 1")
    if not torch.cuda.is_available():
        one_line(capsys, 1, ["pack", str(source), "-o", str(out), "--device", "cuda"], "no CUDA device")
    assert not out.exists() and not (tmp_path / "x.zarr.partial").exists()
    region = ["region", str(archive), "--x", "0", "--y", "0", "--width", "80", "--height", "80",
              "-o", str(tmp_path / "r.png")]
    for bad in ("-1", "0", "9"):
        one_line(capsys, 1, [*region, "--levels", bad], "flow levels to decode must be 1 to 3")
    one_line(capsys, 3, ["verify", str(archive), "--source", str(other), "--scheduler", "synchronous"],
             "not its source")


def test_ctrl_c_of_a_pack_on_the_embedded_cluster_is_one_line(tmp_path):
    """Ctrl-C reaches the whole process group; the workers ignore it and only the client answers:
    one line and exit 130, not a traceback per worker."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from slides import mosaic, pyramid, write_pyramidal_tiff
    from wsi_idf.jobs.pack import RECORDS_DIR
    slide = write_pyramidal_tiff(tmp_path / "big.tif", pyramid(mosaic(2400, 2400, seed=8), 1))
    out = tmp_path / "big.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "wsi_idf.cli", "pack", str(slide), "-o", str(out), "--workers", "1",
                             "-q"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[1])
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "big.zarr.partial" / RECORDS_DIR).rglob("*.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines() == [f"wsi-idf: interrupted; the unfinished archive is kept at {out}.partial: run "
                                         "the same command with --resume to finish it"], err[-2000:]
