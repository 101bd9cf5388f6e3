"""Fuzz an archive's metadata in a memory-limited process: every CLI reader must end with exit 0, 1
or 3 and one line, never a traceback, a hang or memory over the limit.

    python tests/hostile_fuzz.py ARCHIVE WORKDIR SEED CASES MEMORY_GB

Run by tests/test_hostile.py in a subprocess with ``resource.setrlimit`` (address space) and an
alarm per case; prints one JSON line: the cases run and the failures.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import random
import resource
import shutil
import signal
import struct
import sys
from pathlib import Path

import google_crc32c
import numpy as np

ODD_VALUES = [0, -1, 1, 79, 81, 2**31, 2**63, -2**63, 10**9, 1e308, math.nan, math.inf, "", "0", "x", "../x",
              "/dev/zero", "**", None, True, [], {}, [0], {"a": 1}, "e3b0c44298fc1c149afbf4c8996fb924" * 2]


def nodes(value, path=()):
    """Every (path, node) in a JSON tree."""
    yield path, value
    if isinstance(value, dict):
        for key, child in value.items():
            yield from nodes(child, path + (key,))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from nodes(child, path + (i,))


def set_at(tree, path, value):
    node = tree
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def mutate_json(path: Path, rng: random.Random, subtree: tuple = ()) -> str:
    tree = json.loads(path.read_text())
    root = tree
    for part in subtree:
        root = root[part]
    candidates = [p for p, _ in nodes(root) if p]
    target = rng.choice(candidates)
    action = rng.random()
    node = root
    for part in target[:-1]:
        node = node[part]
    if action < 0.15 and isinstance(node, dict):
        del node[target[-1]]
        what = f"deleted {'.'.join(map(str, subtree + target))}"
    else:
        value = rng.choice(ODD_VALUES)
        set_at(root, target, value)
        what = f"{'.'.join(map(str, subtree + target))}={value!r}"
    path.write_text(json.dumps(tree))
    return f"{path.name}: {what}"


def mutate_index(archive: Path, rng: random.Random) -> str:
    shards = sorted(p for p in archive.glob("[0-9]/c/0/*/*") if p.is_file())
    path = rng.choice(shards)
    data = path.read_bytes()
    try:  # the level's metadata may itself be mutated already: then assume 2x2 chunks
        level = json.loads((path.parents[3] / "zarr.json").read_text())
        shard = level["chunk_grid"]["configuration"]["chunk_shape"][1]
        cells = (shard // level["codecs"][0]["configuration"]["chunk_shape"][1]) ** 2
    except (KeyError, TypeError, IndexError, ValueError, ZeroDivisionError):
        cells = 4
    if not (isinstance(cells, int) and 1 <= cells and 16 * cells + 4 <= len(data)):
        cells = 4
    size = 16 * cells + 4
    index = np.frombuffer(data[-size:-4], dtype="<u8").copy()
    slot = rng.randrange(len(index))
    index[slot] = rng.choice([0, 1, len(data), len(data) - size, 2**62, 2**63, 2**64 - 1, 2**64 - 2,
                              rng.randrange(2**64), int(index[(slot + 2) % len(index)])])
    raw = index.astype("<u8").tobytes()
    path.write_bytes(data[:-size] + raw + struct.pack("<I", google_crc32c.value(raw)))
    return f"{path.relative_to(archive)}: index word {slot} = {int(index[slot])}"


def mutate(archive: Path, rng: random.Random) -> str:
    kind = rng.choice(["attributes", "attributes", "ome", "level", "index", "preview"])
    if kind == "attributes":
        return mutate_json(archive / "zarr.json", rng, ("attributes", "wsi_idf"))
    if kind == "ome":
        return mutate_json(archive / "zarr.json", rng, ("attributes", "ome"))
    if kind == "level":
        return mutate_json(rng.choice(sorted(archive.glob("[0-9]/zarr.json"))), rng)
    if kind == "preview":
        return mutate_json(rng.choice(sorted([*archive.glob("preview/0/zarr.json"),
                                              *archive.glob("associated/*/zarr.json")])), rng)
    return mutate_index(archive, rng)


class Hang(Exception):
    pass


def main(argv: list[str]) -> int:
    reference, work, seed, cases, memory_gb = Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3]), float(argv[4])
    limit = int(memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from wsi_idf import open_archive
    from wsi_idf.cli import main as cli
    from wsi_idf.errors import WsiIdfError

    def on_alarm(*_):
        raise Hang()

    signal.signal(signal.SIGALRM, on_alarm)
    rng = random.Random(seed)
    failures, codes = [], {}
    for case in range(cases):
        archive = work / f"case-{case}.zarr"
        shutil.copytree(reference, archive)
        what = mutate(archive, rng)
        if rng.random() < 0.3:
            what += "; " + mutate(archive, rng)
        commands = [["info", str(archive)], ["verify", str(archive), "-q", "--scheduler", "synchronous"],
                    ["region", str(archive), "--x", "70", "--y", "70", "--width", "100", "--height", "100",
                     "-o", str(work / "region.png"), "--overwrite", "-q"],
                    ["unpack", str(archive), "-o", str(work / "unpacked.tif"), "--overwrite", "-q"]]
        for command in commands:
            stderr = io.StringIO()
            signal.alarm(120)
            try:
                with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                    code = cli(command)
                if code not in (0, 1, 3) or stderr.getvalue().count("\n") > 1:
                    failures.append({"mutation": what, "command": command[0], "code": code,
                                     "stderr": stderr.getvalue()[-300:]})
                codes[code] = codes.get(code, 0) + 1
            except Hang:
                failures.append({"mutation": what, "command": command[0], "error": "hang (over 120 s)"})
            except BaseException as exc:  # noqa: BLE001 - anything escaping main is a traceback for the user
                failures.append({"mutation": what, "command": command[0], "error": f"{type(exc).__name__}: {exc}"[:300]})
            finally:
                signal.alarm(0)
        try:  # the API readers too
            signal.alarm(120)
            opened = open_archive(archive)
            opened.region(0, 0, 0, 80, 80)
            for name in opened.metadata.get("associated", []):
                opened.associated(name)
            opened.preview(0)
        except WsiIdfError:
            pass
        except BaseException as exc:  # noqa: BLE001
            failures.append({"mutation": what, "command": "api", "error": f"{type(exc).__name__}: {exc}"[:300]})
        finally:
            signal.alarm(0)
        shutil.rmtree(archive)
    print(json.dumps({"cases": cases, "exit_codes": codes, "failures": failures}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
