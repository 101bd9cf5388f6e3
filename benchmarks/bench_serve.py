"""``wsi-idf serve`` on 2 CPU cores: time to first tile, warm tile latency, RSS after browsing.

Packs the TCGA JPEG 2000 SVS both ways (kept JPEG 2000 tiles, and IDF-coded with ``--codec idf``),
starts ``wsi-idf serve`` on the folder in its own process, and times 254 px PNG tiles of level 0
over HTTP: the first tile of a fresh server (model load, first decode), then distinct tiles one
after another (warm: the process is up, each tile decodes its own chunks), then a minute of
browsing (random tiles of every level, 4 clients at once), after which the server's RSS is read.

    python benchmarks/bench_serve.py --out results
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from wsi_idf import pack_slide  # noqa: E402
from wsi_idf.model.data import data_dir  # noqa: E402


def get(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as response:
        response.read()
        return time.perf_counter() - t0, response.status


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--browse-seconds", type=float, default=60)
    args = parser.parse_args()
    work = args.out / "bench_serve"
    work.mkdir(parents=True, exist_ok=True)
    slide = data_dir() / "slides" / "tcga-cr-7395-01a-01-ts1.svs"
    for name, codec in (("kept", "auto"), ("idf", "idf")):
        if not (work / f"{name}.zarr").exists():
            pack_slide(slide, work / f"{name}.zarr", codec=codec, scheduler="synchronous")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "wsi_idf.cli", "serve", str(work), "--port", str(port), "-q"],
                              cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            get(url + "/api/slides")
            break
        except OSError:
            time.sleep(0.2)
    rows = []
    try:
        top = 13  # ceil(log2(4443))
        for name in ("idf", "kept"):
            first, _ = get(f"{url}/slides/{name}_files/{top}/5_5.png")
            warm = [get(f"{url}/slides/{name}_files/{top}/{c}_{r}.png")[0] for c in range(6, 11) for r in range(2, 6)]
            rows.append({"level storage": name, "first tile s": round(first, 3),
                         "warm tile median ms": round(1000 * statistics.median(warm), 1),
                         "warm tile p90 ms": round(1000 * sorted(warm)[int(0.9 * len(warm))], 1), "tiles": len(warm)})
        stop = time.time() + args.browse_seconds
        served = []

        def browse(seed: int) -> None:
            rng = random.Random(seed)
            while time.time() < stop:
                name = rng.choice(["idf", "kept"])
                level = rng.randint(8, top)
                scale = 2 ** (top - level)
                cols, rows_ = -(-(-(-4443 // scale)) // 254), -(-(-(-3567 // scale)) // 254)
                seconds, _ = get(f"{url}/slides/{name}_files/{level}/{rng.randrange(cols)}_{rng.randrange(rows_)}.png")
                served.append(seconds)

        clients = [threading.Thread(target=browse, args=(k,)) for k in range(4)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        browse_row = {"tiles served while browsing": len(served), "median s": round(statistics.median(served), 3),
                      "server RSS MB after browsing": round(rss_mb(server.pid), 1)}
    finally:
        server.terminate()
        server.wait(timeout=30)
    table = ["| level storage | first tile s | warm tile median ms | warm tile p90 ms | tiles |", "|---|---|---|---|---|"]
    table += [f"| {r['level storage']} | {r['first tile s']} | {r['warm tile median ms']} | {r['warm tile p90 ms']} | "
              f"{r['tiles']} |" for r in rows]
    table.append("")
    table.append(f"browsing {args.browse_seconds:.0f} s with 4 clients: {browse_row['tiles served while browsing']} tiles, "
                 f"median {browse_row['median s']} s, server RSS {browse_row['server RSS MB after browsing']} MB")
    text = "\n".join(table)
    print(text)
    (args.out / "bench_serve.md").write_text(text + "\n")
    (args.out / "bench_serve.json").write_text(json.dumps({"tiles": rows, "browse": browse_row}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
