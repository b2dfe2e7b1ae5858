"""netoken: keyed TCP-option watermarks for SYNs (TC marker, XDP guard)."""

__version__ = "0.1.0"
