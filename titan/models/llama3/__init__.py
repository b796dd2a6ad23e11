"""Llama 3: model, flavors, and the Hugging Face state-dict adapter."""

from titan.models.llama3.args import FLAVORS, ModelArgs, RoPEScaling
from titan.models.llama3.model import Transformer

__all__ = ["FLAVORS", "ModelArgs", "RoPEScaling", "Transformer"]
