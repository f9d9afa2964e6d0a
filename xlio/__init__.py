"""xlio: cross-layer paravirtual I/O for nested virtualization, measured."""

__version__ = "0.1.0"
