"""The package version, in one place: pyproject.toml reads it, and so do the plan cache's file names."""

__version__ = "0.1.0"
