"""The version of upop (its own module, so no part of upop imports the package face for it)."""

__version__ = "0.1.0"
