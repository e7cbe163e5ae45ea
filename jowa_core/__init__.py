"""jowa_core: the computing half of jowa-workbench (JOWA, ICLR 2025, re-implemented)."""

__version__ = "0.1.0"
