"""The wsi-idf command line, run in process."""
from __future__ import annotations

import json

import pytest

from conftest import DATA, NO_DATA
from wsi_idf.cli import main


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(r["installed"] for r in rows)
    registered = [r for r in rows if r["status"] == "registered"]
    assert [r["name"] for r in registered if r["default"]] == ["fast"]
    assert all(r["measured"]["val_bpsp"] > 0 and r["measured"]["decode_mpx_s"] > 0 for r in registered)
    assert {r["weights"] for r in rows} >= {"fast-01b41279.safetensors", "max-c2b8d2d9.safetensors"}


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
