"""bootstrap: pull images, keep them in a shared store, run them as systemd system containers."""

__version__ = "0.1.0"
