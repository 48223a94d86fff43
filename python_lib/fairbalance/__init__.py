"""fairbalance: find hidden imbalance and bias in image datasets and repair it."""

__version__ = "0.1.0"
