"""Bascule: a pluggable load-balancing HTTP reverse proxy."""

__all__ = ["__version__"]

__version__ = "0.1.0"
