"""``wsi-idf serve``: look at archived slides in a browser (catalog, OpenSeadragon viewer, Deep Zoom tiles)."""
