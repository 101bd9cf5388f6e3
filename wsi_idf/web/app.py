"""``wsi-idf serve``: a read-only archive browser over HTTP (Starlette, served by uvicorn).

Routes (the Deep Zoom convention of OpenSeadragon and OpenSlide's deepzoom server):

    GET /                                        catalog page (every archive under the served folder)
    GET /slides/{name}                           viewer page (OpenSeadragon, navigator, scale bar, metadata)
    GET /slides/{name}.dzi                       Deep Zoom descriptor (XML)
    GET /slides/{name}_files/{level}/{col}_{row}.{png|jpeg}    a 254 px tile, 1 px overlap
    GET /slides/{name}/associated/{image}.png    label (only with --show-label), macro, thumbnail
    GET /slides/{name}/thumbnail.png             the catalog's thumbnail
    GET /api/slides, /api/slides/{name}          the catalog and one archive's metadata, as JSON

Tiles decode in worker threads, at most one per core at a time (``coding.policy.decode_slots``), through the
checked reader: a damaged chunk answers its tile with HTTP 500 (the viewer marks the tile), never
with other pixels; anything beyond the slide is 404.
"""
from __future__ import annotations

import html
import io
import json
from pathlib import Path

import anyio
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import ArchiveError, CorruptPatchError
from ..coding.policy import decode_slots as policy_decode_slots
from .catalog import Entry, load_catalog
from .deepzoom import FORMATS, ChunkCache, DeepZoom, TileNotFound

STATIC = Path(__file__).parent / "static"
ASSOCIATED = ("label", "macro", "thumbnail")


class Server:
    """The state behind the routes: the catalog, open archives, their Deep Zoom views, one cache."""

    def __init__(self, root: Path, show_label: bool = False, decode_slots: int | None = None):
        self.root, self.show_label = Path(root), show_label
        self.catalog: dict[str, Entry] = load_catalog(self.root)
        self.cache = ChunkCache()
        self.views: dict[str, DeepZoom] = {}
        self.slots = anyio.CapacityLimiter(decode_slots or policy_decode_slots())

    def entry(self, name: str) -> Entry:
        entry = self.catalog.get(name)
        if entry is None or entry.error:
            raise TileNotFound(f"no slide {name[:60]!r}")
        return entry

    def view(self, name: str) -> DeepZoom:
        if name not in self.views:
            from ..archive.layout import open_archive
            self.views[name] = DeepZoom(open_archive(self.entry(name).path), self.cache)
        return self.views[name]

    async def run(self, fn, *args):
        """Decoding work in a worker thread, at most ``slots`` at once: requests share the cores."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.slots)


def not_found(message: str = "not found") -> Response:
    return Response(message, status_code=404, media_type="text/plain")


def damaged(exc: Exception) -> Response:
    """A tile or image that does not decode: an error the viewer marks, never other pixels."""
    return Response(f"damaged: {exc}", status_code=500, media_type="text/plain", headers={"X-WSI-IDF-Damaged": "1"})


def build_app(root: str | Path, show_label: bool = False) -> Starlette:
    """The ASGI app serving the archive (or folder of archives) ``root``."""
    server = Server(Path(root), show_label)

    async def catalog_page(request: Request) -> Response:
        return HTMLResponse(render_catalog(server))

    async def viewer_page(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            entry = server.entry(name)
            meta = (await server.run(server.view, name)).archive.metadata
        except (TileNotFound, ArchiveError):
            return not_found()
        return HTMLResponse(render_viewer(entry, meta, server.show_label))

    async def slide_route(request: Request) -> Response:
        """Everything under ``/slides/``: names may hold dots and underscores, so the path is parsed here."""
        path = request.path_params["path"]
        parts = path.split("/")
        if len(parts) == 1 and not path.endswith(".dzi"):
            request.path_params["name"] = path
            return await viewer_page(request)
        if len(parts) == 2 and parts[1] == "thumbnail.png":
            request.path_params["name"] = parts[0]
            return await thumbnail(request)
        if len(parts) == 3 and parts[1] == "associated" and parts[2].endswith(".png"):
            request.path_params.update(name=parts[0], image=parts[2][:-4])
            return await associated_image(request)
        try:
            if path.endswith(".dzi") and "/" not in path:
                view = await server.run(server.view, path[:-4])
                return Response(view.dzi(), media_type="application/xml")
            name, _, rest = path.partition("_files/")
            parts = rest.split("/")
            if len(parts) != 2 or "." not in parts[1] or "_" not in parts[1]:
                return not_found()
            stem, fmt = parts[1].rsplit(".", 1)
            col, row = stem.split("_", 1)
            if fmt not in FORMATS or not (parts[0].isdigit() and col.isdigit() and row.isdigit()):
                return not_found()
            view = await server.run(server.view, name)
            data = await server.run(view.tile, int(parts[0]), int(col), int(row), fmt)
        except TileNotFound as exc:
            return not_found(str(exc))
        except (CorruptPatchError, ArchiveError) as exc:
            return damaged(exc)
        return Response(data, media_type=f"image/{fmt}", headers={"Cache-Control": "max-age=3600"})

    async def associated_image(request: Request) -> Response:
        name, image = request.path_params["name"], request.path_params["image"]
        if image not in ASSOCIATED or (image == "label" and not server.show_label):
            return not_found()

        def read() -> bytes:
            archive = server.view(name).archive
            if image not in archive.metadata["associated"]:
                raise TileNotFound(f"{name} has no {image} image")
            return _png(archive.associated, image)
        return await png_response(read)

    async def thumbnail(request: Request) -> Response:
        return await png_response(lambda: _thumbnail(server.view(request.path_params["name"])))

    async def png_response(read, *args) -> Response:
        """A PNG made in a worker thread: 404 for what is not there, HTTP 500 for what is damaged."""
        try:
            data = await server.run(read, *args)
        except TileNotFound:
            return not_found()
        except (CorruptPatchError, ArchiveError) as exc:
            return damaged(exc)
        return Response(data, media_type="image/png")

    async def api_slides(request: Request) -> Response:
        return JSONResponse([e.summary or {"name": e.name, "error": e.error} for e in server.catalog.values()])

    async def api_slide(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            meta = (await server.run(server.view, name)).archive.metadata
        except (TileNotFound, ArchiveError):
            return not_found()
        return JSONResponse({**server.catalog[name].summary, "metadata": public_metadata(meta, server.show_label)})

    routes = [Route("/", catalog_page), Route("/api/slides", api_slides), Route("/api/slides/{name}", api_slide),
              Route("/slides/{path:path}", slide_route), Mount("/static", StaticFiles(directory=STATIC), name="static")]
    app = Starlette(routes=routes)
    app.state.server = server
    return app


def _png(read, image: str) -> bytes:
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(read(image)).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _thumbnail(view: DeepZoom, side: int = 256) -> bytes:
    """The catalog thumbnail: the Deep Zoom level that fits in ``side`` pixels, whole."""
    from PIL import Image
    level = next(lv for lv in range(view.max_level, -1, -1) if max(view.level_size(lv)) <= side)
    w, h = view.level_size(level)
    source, exact = view.source_for(level)
    sx, sy = source.width, source.height
    from .deepzoom import shrink
    pixels = view.region(source, 0, 0, sx, sy)
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels if exact else shrink(pixels, (h, w)))).save(out, format="PNG")
    return out.getvalue()


def public_metadata(meta: dict, show_label: bool) -> dict:
    """The archive metadata for the API and the viewer: without the ICC profile's bytes, and without
    label properties unless labels are shown (they may carry patient identifiers)."""
    slide = dict(meta["slide"])
    slide["icc_profile"] = bool(slide.get("icc_profile"))
    if not show_label:
        slide["properties"] = {k: v for k, v in slide["properties"].items() if ".label." not in k}
    return {**{k: v for k, v in meta.items() if k not in ("slide", "checksums")}, "slide": slide}


PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<link rel="stylesheet" href="/static/style.css"></head><body>{body}</body></html>"""


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def render_catalog(server: Server) -> str:
    e = html.escape
    rows = []
    for entry in server.catalog.values():
        s = entry.summary
        if entry.error:
            rows.append(f'<tr class="error"><td>{e(entry.name)}</td><td colspan="11">{e(entry.error)}</td></tr>')
            continue
        mpp = f"{s['mpp'][0]:.3f}" if s["mpp"] else "unknown"
        rows.append(
            f'<tr><td><a href="/slides/{e(entry.name)}"><img class="thumb" alt="{e(entry.name)}" '
            f'src="/slides/{e(entry.name)}/thumbnail.png"></a></td>'
            f'<td><a href="/slides/{e(entry.name)}">{e(entry.name)}</a></td>'
            f'<td data-value="{s["width"] * s["height"]}">{s["width"]} x {s["height"]}</td><td>{mpp}</td>'
            f'<td>{e(str(s["objective_power"] or ""))}</td><td>{e(s["vendor"] or "")}, {e(s["source_format"] or "")}'
            f'<br><small>{e(s["source"])}</small></td>'
            f'<td data-value="{s["archive_bytes"]}">{_mb(s["archive_bytes"])}</td>'
            f'<td data-value="{1 / s["ratio_to_source"]:.4f}">{1 / s["ratio_to_source"]:.3f}x</td>'
            f'<td data-value="{s["ratio_to_raw"]}">{s["ratio_to_raw"]:.2f}x smaller</td><td>{e(s["storage"])}</td>'
            f'<td>{"yes" if s["restorable"] else "no"}</td><td>{e(str(s["verified"] or "not recorded"))}</td></tr>')
    head = "".join(f"<th>{h}</th>" for h in ("", "slide", "size (px)", "MPP (µm)", "objective", "source",
                                             "archive", "x source", "x raw", "levels stored as", "restorable",
                                             "last verify"))
    body = (f"<h1>wsi-idf archive: {e(str(server.root))}</h1><p>{len(server.catalog)} archive(s). Click a column "
            f"to sort.</p><table id=\"catalog\" class=\"sortable\"><thead><tr>{head}</tr></thead><tbody>"
            f"{''.join(rows)}</tbody></table><script src=\"/static/catalog.js\"></script>")
    return PAGE.format(title="wsi-idf archive", body=body)


def render_viewer(entry: Entry, meta: dict, show_label: bool) -> str:
    e = html.escape
    public = public_metadata(meta, show_label)
    properties = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>"
                         for k, v in sorted(public["slide"]["properties"].items()))
    source = meta["source"]
    provenance = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in (
        ("source", source["name"]), ("sha256", source["sha256"]), ("read with", source["decoder"].get("reader")),
        ("wsi-idf", meta["wsi_idf_version"]), ("model", f"{meta['model']['name']} ({meta['model']['weights'][:16]}...)"),
        ("restorable", "yes" if entry.summary.get("restorable") else "no"), ("stored as", entry.summary.get("storage"))))
    images = "".join(f'<figure><img src="/slides/{e(entry.name)}/associated/{n}.png" alt="{n}"><figcaption>{n}'
                     f'</figcaption></figure>' for n in meta["associated"] if n != "label" or show_label)
    hidden = "<p><small>label hidden (it may carry patient identifiers; serve with --show-label)</small></p>" \
        if "label" in meta["associated"] and not show_label else ""
    mpp = meta["slide"].get("mpp")
    config = json.dumps({"dzi": f"/slides/{entry.name}.dzi", "mpp": mpp[0] if mpp else None})
    body = (f'<header><a href="/">archive</a> / {e(entry.name)}</header><div id="layout"><div id="viewer"></div>'
            f'<div id="scalebar"><div id="scalebar-line"></div><span id="scalebar-text"></span></div>'
            f'<aside><h2>{e(entry.name)}</h2><table>{provenance}</table>{images}{hidden}<h3>properties</h3>'
            f'<table class="properties">{properties}</table></aside></div>'
            f'<script src="/static/openseadragon/openseadragon.min.js"></script>'
            f'<script>window.WSI_IDF = {config};</script><script src="/static/viewer.js"></script>')
    return PAGE.format(title=f"{entry.name} - wsi-idf", body=body)


def serve(root: str | Path, host: str = "127.0.0.1", port: int = 8000, show_label: bool = False,
          log_level: str = "warning") -> None:
    """Serve ``root`` until interrupted."""
    import uvicorn
    app = build_app(root, show_label)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["build_app", "serve"]
