"""The rooms of ``wsi_idf`` and the direction of their imports (README "Architecture").

coding <- storage <- archive <- jobs, and model -> coding: a room never imports one to its right,
so there is no import cycle, and decoding an archive never loads the float models or training (only
a pack that adapts its model to the slide, a job, does).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wsi_idf"
# what each room may import from the others (top-level modules: errors, config, slide, ... are shared)
ALLOWED = {
    "coding": set(),
    "storage": {"coding"},
    "archive": {"coding", "storage"},
    "jobs": {"coding", "storage", "archive", "model"},
    "model": {"coding"},
    "web": {"coding", "storage", "archive"},
}


def _imported_rooms(path: Path) -> set[str]:
    room = path.relative_to(PACKAGE).parts[0]
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = (node.module or "").split(".")
            if node.level == 1:  # inside the same room (or from the top level, for top-level modules)
                continue
            if node.level == 2 and parts[0] in ALLOWED:
                rooms.add(parts[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("wsi_idf."):
            target = node.module.split(".")[1]
            if target in ALLOWED and target != room:
                rooms.add(target)
    return rooms


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_rooms_import_only_to_their_left(room):
    for path in sorted((PACKAGE / room).glob("*.py")):
        assert _imported_rooms(path) <= ALLOWED[room], f"{path.name} imports {_imported_rooms(path) - ALLOWED[room]}"


def test_every_module_lives_in_a_room_or_is_shared():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == {"__init__", "cli", "commands", "config", "digests", "errors", "outputs", "slide", "slide_base",
                   "dicom_slide", "_version"}
    for room in ALLOWED:
        assert (PACKAGE / room / "__init__.py").is_file()


def test_reading_an_archive_never_loads_training_code():
    """A fresh process that reads an archive through plain zarr and through ``open_archive``, and
    codes patches, imports nothing from ``wsi_idf.model`` (the float models, training)."""
    fixture = Path(__file__).parent / "fixtures" / "archive_v1.zarr"
    script = (
        "import sys, numpy as np, zarr, wsi_idf\n"
        f"pixels = zarr.open_group({str(fixture)!r}, mode='r')['0'][:, :160, :160]\n"
        f"assert (wsi_idf.open_archive({str(fixture)!r}).region(0, 0, 0, 160, 160) == pixels.transpose(1, 2, 0)).all()\n"
        "patches = np.ascontiguousarray(pixels.reshape(3, 2, 80, 2, 80).transpose(1, 3, 0, 2, 4).reshape(4, 3, 80, 80))\n"
        "assert (wsi_idf.decode_patches(wsi_idf.encode_patches(patches)) == patches).all()\n"
        "print(sorted(m for m in sys.modules if m.startswith('wsi_idf.model')))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_lossy_compressions_have_one_owner():
    from wsi_idf.slide import LOSSY_COMPRESSIONS
    from wsi_idf.storage.source_tiles import KEPT_KINDS
    assert KEPT_KINDS.keys() <= LOSSY_COMPRESSIONS


def _module_graph() -> dict[str, set[str]]:
    """Which wsi_idf modules each module imports, at the top or inside functions."""
    modules = {".".join(("wsi_idf", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                for alias in node.names:
                    deps.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        graph[name] = {d for d in deps if d in modules and d != name}  # the root (the facade) included
    return graph


def test_no_import_cycle_even_through_lazy_imports():
    graph = _module_graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path[path.index(dep):] + [dep]) \
                if dep in path else f"import cycle through {dep}"
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert len(graph) > 30


def test_public_api_resolves_from_the_top():
    import wsi_idf
    for name in wsi_idf.__all__:
        value = getattr(wsi_idf, name)
        if callable(value):  # functions and classes of wsi-idf itself, not something else of that name
            assert value.__module__.startswith("wsi_idf"), (name, value.__module__)
        else:
            assert isinstance(value, (str, dict)) and value, name
    assert wsi_idf.WsiIdfCodec.__module__ == "wsi_idf.storage.zarr_codec"


def test_importing_wsi_idf_changes_nothing_in_the_process():
    """No side effects at import: the environment, zarr's configuration and the loaded modules stay
    as they were until coding loads torch (then OMP_WAIT_POLICY defaults to PASSIVE; a user's value wins)."""
    code = ("import os, sys, zarr; before = dict(os.environ); batch = zarr.config.get('codec_pipeline.batch_size'); "
            "import wsi_idf, wsi_idf.archive, wsi_idf.slide; "
            "print(dict(os.environ) == before, zarr.config.get('codec_pipeline.batch_size') == batch, "
            "'torch' in sys.modules, 'wsi_idf.coding.runtime' in sys.modules); "
            "wsi_idf.decode_patches; print(os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["True", "True", "False", "False", "PASSIVE"]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(env, OMP_WAIT_POLICY="ACTIVE"))
    assert out.stdout.split()[-1] == "ACTIVE"
