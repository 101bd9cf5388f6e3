"""``wsi-idf serve`` (issue 24): every route over HTTP, traversal attempts, damage, concurrency, and a real
headless browser (Debian's chromium) showing tissue from exact tiles."""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import NO_DATA
from slides import CMU_SVS, TILE_FOLDER, mosaic, pyramid, write_pyramidal_tiff
from wsi_idf import open_archive, pack_slide

pytestmark = pytest.mark.skipif(not TILE_FOLDER.is_dir() or not CMU_SVS.exists(), reason=NO_DATA)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """A lab's archive folder: an IDF-coded pyramid, the CMU slide with its own tiles, two archives
    whose names collide, a damaged copy, a manifest, and a link that leads out of the folder."""
    root = tmp_path_factory.mktemp("served")
    outside = tmp_path_factory.mktemp("outside")
    source = write_pyramidal_tiff(outside / "tissue.tif", pyramid(mosaic(1100, 1400, seed=3), 2))
    (root / "lab").mkdir()
    pack_slide(source, root / "lab" / "tissue.zarr", scheduler="synchronous")
    pack_slide(CMU_SVS, root / "cmu.zarr", scheduler="synchronous")
    (root / "other").mkdir()
    shutil.copytree(root / "cmu.zarr", root / "other" / "cmu.zarr")  # the same name in another folder
    shutil.copytree(root / "lab" / "tissue.zarr", root / "damaged.zarr")
    shard = root / "damaged.zarr" / "0" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0x20  # inside the first patch (the tile 0_0 of the top level)
    shard.write_bytes(bytes(data))
    pack_slide(source, outside / "secret.zarr", scheduler="synchronous")
    (root / "link.zarr").symlink_to(outside / "secret.zarr")  # leads out of the served folder: never served
    (root / "lab" / "manifest.json").write_text(json.dumps([{"slide": str(source), "archive": str(
        root / "lab" / "tissue.zarr"), "status": "done", "verified": "restored"}]))
    return root


@pytest.fixture(scope="module")
def client(served):
    from starlette.testclient import TestClient
    from wsi_idf.web.app import build_app
    return TestClient(build_app(served))


def png(data: bytes) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_catalog_lists_every_archive_under_the_folder_and_nothing_outside(client):
    slides = {s["name"]: s for s in client.get("/api/slides").json()}
    assert sorted(slides) == ["cmu", "damaged", "other-cmu", "tissue"]
    tissue = slides["tissue"]
    assert (tissue["width"], tissue["height"], tissue["storage"], tissue["verified"]) == (1400, 1100, "idf", "restored")
    assert slides["cmu"]["storage"] == "source (jpeg)" and slides["cmu"]["restorable"]
    page = client.get("/")
    assert page.status_code == 200 and 'href="/slides/tissue"' in page.text and "secret" not in page.text
    assert all(client.get(f"/slides/{name}/thumbnail.png").status_code == 200 for name in ("cmu", "tissue"))


def test_dzi_and_tiles_are_the_stored_pixels_at_archive_levels(client, served):
    dzi = client.get("/slides/tissue.dzi")
    assert dzi.status_code == 200 and 'Width="1400" Height="1100"' in dzi.text and 'TileSize="254"' in dzi.text
    archive = open_archive(served / "lab" / "tissue.zarr")
    top = 11  # ceil(log2(1400))
    for level, archive_level, col, row in ((top, 0, 0, 0), (top, 0, 2, 3), (top, 0, 5, 4), (top - 1, 1, 1, 1)):
        tile = png(client.get(f"/slides/tissue_files/{level}/{col}_{row}.png").content)
        x0, y0 = max(0, col * 254 - 1), max(0, row * 254 - 1)
        expected = archive.region(archive_level, x0, y0, tile.shape[1], tile.shape[0])
        assert np.array_equal(tile, expected), (level, col, row)
    assert tile.shape[:2] != (0, 0)
    small = png(client.get("/slides/tissue_files/8/0_0.png").content)  # from the preview: 175x138
    assert small.shape == (138, 175, 3) and small.std() > 5
    jpeg = client.get("/slides/cmu_files/12/3_3.jpeg")
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    assert client.get("/slides/tissue_files/12/0_0.png").status_code == 404  # beyond the pyramid
    assert client.get(f"/slides/tissue_files/{top}/6_0.png").status_code == 404  # beyond the slide
    assert client.get(f"/slides/tissue_files/{top}/0_0.gif").status_code == 404


def test_viewer_and_api_hide_the_label_unless_asked(client, served):
    page = client.get("/slides/cmu")
    assert page.status_code == 200 and "openseadragon.min.js" in page.text and "label hidden" in page.text
    assert client.get("/slides/cmu/associated/label.png").status_code == 404
    assert client.get("/slides/cmu/associated/macro.png").status_code == 200
    meta = client.get("/api/slides/cmu").json()["metadata"]
    assert not any(".label." in k for k in meta["slide"]["properties"])
    from starlette.testclient import TestClient
    from wsi_idf.web.app import build_app
    shown = TestClient(build_app(served / "cmu.zarr", show_label=True))
    assert [s["name"] for s in shown.get("/api/slides").json()] == ["cmu"]
    assert shown.get("/slides/cmu/associated/label.png").status_code == 200


@pytest.mark.parametrize("path", [
    "/slides/..%2F..%2Fetc%2Fpasswd.dzi", "/slides/../../etc/passwd", "/static/../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/etc/passwd", "/slides/%2Fetc%2Fpasswd_files/0/0_0.png", "/slides/link.dzi",
    "/slides/link", "/slides/secret.dzi", "/api/slides/..%2Fsecret", "/slides/cmu_files/../../x/0_0.png",
    "/slides/cmu_files/12/-1_0.png", "/slides/cmu/associated/../../../etc/passwd.png"])
def test_traversal_attempts_are_404(client, path):
    response = client.get(path)
    assert response.status_code == 404, (path, response.status_code)
    assert b"root:" not in response.content


def test_a_damaged_chunk_is_an_http_error_for_its_tile_only(client):
    bad = client.get("/slides/damaged_files/11/0_0.png")
    assert bad.status_code == 500 and bad.headers.get("x-wsi-idf-damaged") == "1" and "damaged" in bad.text
    assert client.get("/slides/damaged_files/11/5_4.png").status_code == 200


@pytest.fixture(scope="module")
def live(served):
    """A real uvicorn server on a free loopback port, logging every request it serves."""
    import uvicorn
    from wsi_idf.web.app import build_app
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(served)
    requested: list[str] = []

    async def log_requests(scope, receive, send):
        if scope["type"] == "http":
            requested.append(scope["path"])
        await app(scope, receive, send)

    server = uvicorn.Server(uvicorn.Config(log_requests, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "requested": requested}
    server.should_exit = True
    thread.join(timeout=10)


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_concurrent_tile_requests_are_all_answered_exactly(live, served):
    """24 tile requests at once from 8 threads: every answer is the stored pixels."""
    archive = open_archive(served / "lab" / "tissue.zarr")
    cells = [(c, r) for c in range(6) for r in range(4)]
    results: dict = {}

    def worker(part):
        for c, r in part:
            results[(c, r)] = fetch(f"{live['url']}/slides/tissue_files/11/{c}_{r}.png")

    threads = [threading.Thread(target=worker, args=(cells[k::8],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for (c, r), (status, data) in results.items():
        tile = png(data)
        assert status == 200 and np.array_equal(
            tile, archive.region(0, max(0, c * 254 - 1), max(0, r * 254 - 1), tile.shape[1], tile.shape[0]))
    assert len(results) == len(cells)


def screenshot(url: str, out: Path, budget_ms: int = 20000, size: str = "1400,900") -> np.ndarray:
    from PIL import Image
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={out.parent / ('chromium-' + out.stem)}", f"--window-size={size}",
                    "--hide-scrollbars", f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=180)
    return np.asarray(Image.open(out).convert("RGB"))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it with apt)")
def test_a_real_browser_shows_tissue_from_exact_tiles(live, served, tmp_path):
    """Headless chromium opens the catalog and a viewer: thumbnails and tissue appear on screen, and
    every archive-level PNG tile the viewer loaded is exactly the stored pixels."""
    catalog = screenshot(f"{live['url']}/", tmp_path / "catalog.png", 8000, "1400,600")
    assert (catalog.std(axis=2) > 20).mean() > 0.01  # coloured thumbnails, not a blank page
    live["requested"].clear()
    shot = screenshot(f"{live['url']}/slides/tissue", tmp_path / "viewer.png")
    viewer = shot[60:850, 40:1000]  # the OpenSeadragon area, left of the metadata panel
    tissue = (viewer.std(axis=2) > 15) & (viewer.mean(axis=2) < 235)
    assert tissue.mean() > 0.2, f"only {tissue.mean():.1%} of the viewer shows tissue"
    tiles = [p for p in live["requested"] if p.startswith("/slides/tissue_files/")]
    assert tiles, live["requested"]
    archive = open_archive(served / "lab" / "tissue.zarr")
    sizes = {(r.width, r.height): i for i, r in enumerate(archive.readers)}
    checked = 0
    for path in tiles:
        level, name = path.split("/")[-2:]
        col, row = (int(v) for v in name.split(".")[0].split("_"))
        scale = 2 ** (11 - int(level))
        size = (-(-1400 // scale), -(-1100 // scale))
        if size not in sizes:
            continue
        status, data = fetch(live["url"] + path)
        tile = png(data)
        expected = archive.region(sizes[size], max(0, col * 254 - 1), max(0, row * 254 - 1), tile.shape[1], tile.shape[0])
        assert status == 200 and np.array_equal(tile, expected), path
        checked += 1
    assert checked >= 1
    docs = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
    if os.environ.get("WSI_IDF_SCREENSHOTS"):  # `make screenshots` refreshes the README's pictures
        from PIL import Image
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "catalog.png", docs / "catalog.png")
        Image.fromarray(shot).save(docs / "viewer.jpg", quality=85)
