"""No option of any command destroys a file wsi-idf did not write: checked through the CLI, in process,
with the protected files byte-identical afterwards."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from conftest import NO_DATA
from pipelines.archive_batch import main as batch_main
from slides import CMU_SVS, mosaic, write_pyramidal_tiff
from wsi_idf.cli import main

pytestmark = pytest.mark.skipif(not CMU_SVS.exists(), reason=NO_DATA)


def digest(path: Path) -> dict[str, str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """A real-tissue TIFF and its archive."""
    folder = tmp_path_factory.mktemp("outputs")
    source = write_pyramidal_tiff(folder / "small.tif", [mosaic(160, 240, seed=3)])
    assert main(["pack", str(source), "-o", str(folder / "small.zarr"), "--scheduler", "synchronous", "-q"]) == 0
    return source, folder / "small.zarr"


def refused(capsys, argv: list[str], words: str) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and err.count("\n") == 1, err


def test_pack_never_replaces_its_source(tmp_path, capsys):
    copy = tmp_path / "copy.svs"
    shutil.copy(CMU_SVS, copy)
    before = digest(copy)
    refused(capsys, ["pack", str(copy), "-o", str(copy), "--overwrite", "-q"], "is (or holds) the input")
    assert digest(copy) == before


def test_pack_never_replaces_a_folder_of_other_files(tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    shutil.copy(CMU_SVS, precious / "slide.svs")
    (precious / "notes.txt").write_text("x\n")
    before = digest(precious)
    refused(capsys, ["pack", str(precious / "slide.svs"), "-o", str(precious), "--overwrite", "-q"],
            "is (or holds) the input")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("y\n")
    refused(capsys, ["pack", str(precious / "slide.svs"), "-o", str(other), "--overwrite", "-q"],
            "is not a wsi-idf archive")
    refused(capsys, ["pack", str(precious / "slide.svs"), "-o", str(other / "notes.txt"), "--overwrite", "-q"],
            "is not a wsi-idf archive")
    users_partial = tmp_path / "new.zarr.partial"
    users_partial.mkdir()
    (users_partial / "keep.txt").write_text("z\n")
    refused(capsys, ["pack", str(precious / "slide.svs"), "-o", str(tmp_path / "new.zarr"), "--overwrite", "-q"],
            "not an unfinished wsi-idf pack")
    assert digest(precious) == before and (other / "notes.txt").read_text() == "y\n"
    assert (users_partial / "keep.txt").read_text() == "z\n" and not (tmp_path / "new.zarr").exists()


def test_overwrite_replaces_an_archive_and_leaves_nothing_else(small, tmp_path):
    source, _ = small
    out = tmp_path / "a.zarr"
    for _ in range(2):
        assert main(["pack", str(source), "-o", str(out), "--overwrite", "--scheduler", "synchronous", "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr"]


def test_unpack_and_region_replace_only_their_own_files(small, tmp_path, capsys):
    _, archive = small
    user = tmp_path / "user.tif"
    shutil.copy(small[0], user)
    user_png = tmp_path / "user.png"
    user_png.write_bytes(b"\x89PNG not really")
    before = {**digest(user), **digest(user_png), **digest(archive)}
    refused(capsys, ["unpack", str(archive), "-o", str(user), "--overwrite", "-q"], "not a file written by wsi-idf")
    refused(capsys, ["unpack", str(archive), "-o", str(archive), "--overwrite", "-q"], "is (or holds) the input")
    region = ["region", str(archive), "--x", "0", "--y", "0", "--width", "80", "--height", "80", "-q"]
    refused(capsys, [*region, "-o", str(user_png), "--overwrite"], "not a file written by wsi-idf")
    refused(capsys, [*region, "-o", str(tmp_path / "r.jpg")], "lossless")
    refused(capsys, [*region, "-o", str(tmp_path / "no" / "dir" / "r.png")], "cannot write")
    assert {**digest(user), **digest(user_png), **digest(archive)} == before
    ours = tmp_path / "r.png"
    assert main([*region, "-o", str(ours)]) == 0
    refused(capsys, [*region, "-o", str(ours)], "already exists")
    assert main([*region, "-o", str(ours), "--overwrite"]) == 0
    tiff = tmp_path / "s.ome.tif"
    assert main(["unpack", str(archive), "-o", str(tiff), "-q"]) == 0
    assert main(["unpack", str(archive), "-o", str(tiff), "--overwrite", "-q"]) == 0


def test_unwritable_outputs_are_one_clear_line(small, small_disk, capsys):
    import subprocess
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    _, archive = small
    refused(capsys, ["unpack", str(archive), "-o", str(small_disk / "x.tif"), "-q"], "Read-only file system")
    refused(capsys, ["region", str(archive), "--x", "0", "--y", "0", "--width", "80", "--height", "80",
                     "-o", str(small_disk / "r.png"), "-q"], "Read-only file system")
    assert not any(small_disk.iterdir())


def test_batch_refuses_a_folder_with_a_manifest_it_did_not_write(small, tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(small[0], slides / "s.tif")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.csv").write_text("patient,diagnosis\n1,x\n")
    assert batch_main([str(slides), "-o", str(out), "--scheduler", "synchronous", "-q"]) == 1
    assert "did not write" in capsys.readouterr().err
    assert (out / "manifest.csv").read_text() == "patient,diagnosis\n1,x\n" and not (out / "s.zarr").exists()
