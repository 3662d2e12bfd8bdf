"""ExampleGPT: GPT-2 from scratch in PyTorch, clean enough to learn from and solid enough to train with."""

from .config import DataConfig, GenerateConfig, GPTConfig, TrainConfig
from .model import GPT

__all__ = ["GPT", "GPTConfig", "DataConfig", "TrainConfig", "GenerateConfig"]
__version__ = "0.1.0"
