"""The float models and their training: the flows, real-tile data, table building, export.

Training-side only: nothing that decodes an archive imports this room. ``export`` turns a
trained float model into a model file holding the exact integer coding model.
"""
