"""casfs: a content-addressed, lazy-loading container filesystem."""

__version__ = "0.1.0"
