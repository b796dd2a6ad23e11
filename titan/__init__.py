"""titan: a PyTorch-native, composable trainer for Llama 3."""

__version__ = "0.1.0"
