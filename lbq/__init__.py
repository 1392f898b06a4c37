"""lbq: training convolutional networks with low-bitwidth weights and activations."""

__version__ = "0.1.0"
