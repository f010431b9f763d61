"""treg: preference optimization with token-level reward regularization (T-REG, arXiv 2412.02685)."""

__version__ = "0.1.0"
