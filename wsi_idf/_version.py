"""The version, stated once: the package reads it here, and pyproject.toml reads it from here."""
__version__ = "0.6.0"
