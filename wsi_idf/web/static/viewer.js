// The viewer: OpenSeadragon over the archive's Deep Zoom tiles, a navigator, a scale bar from the
// slide's MPP, and a red hatched marker over any tile the server could not decode (damaged).
const config = window.WSI_IDF;
const viewer = OpenSeadragon({
  id: "viewer", prefixUrl: "/static/openseadragon/images/", tileSources: config.dzi,
  showNavigator: true, navigatorPosition: "TOP_RIGHT", maxZoomPixelRatio: 4, crossOriginPolicy: false,
});
window.wsiIdfViewer = viewer;
const damaged = new Set();
viewer.addHandler("tile-load-failed", (event) => {
  const tile = event.tile;
  const key = `${tile.level}/${tile.x}_${tile.y}`;
  if (damaged.has(key)) return;
  damaged.add(key);
  const marker = document.createElement("div");
  marker.className = "damaged-tile";
  marker.title = `tile ${key} is damaged in the archive`;
  viewer.addOverlay({ element: marker, location: viewer.viewport.imageToViewportRectangle(tile.bounds ?
    event.tiledImage.viewportToImageRectangle(tile.bounds) : new OpenSeadragon.Rect(0, 0, 1, 1)) });
  document.body.dataset.damagedTiles = String(damaged.size);
});
function niceLength(micrometres) {
  const power = Math.pow(10, Math.floor(Math.log10(micrometres)));
  for (const step of [5, 2, 1]) if (step * power <= micrometres) return step * power;
  return power;
}
function updateScaleBar() {
  const text = document.getElementById("scalebar-text");
  const line = document.getElementById("scalebar-line");
  if (!config.mpp || !viewer.world.getItemAt(0)) { document.getElementById("scalebar").style.display = "none"; return; }
  const imageZoom = viewer.viewport.viewportToImageZoom(viewer.viewport.getZoom(true));  // screen px per image px
  const micrometresPerScreenPixel = config.mpp / imageZoom;
  const length = niceLength(micrometresPerScreenPixel * 150);
  line.style.width = `${Math.round(length / micrometresPerScreenPixel)}px`;
  text.textContent = length >= 1000 ? `${length / 1000} mm` : `${length} µm`;
}
viewer.addHandler("animation", updateScaleBar);
viewer.addHandler("open", updateScaleBar);
viewer.addHandler("tile-drawn", () => { document.body.dataset.tilesDrawn = "1"; });
