"""ExampleGPT: GPT-2 from scratch in PyTorch, clean enough to learn from and solid enough to train with.

The Python API in one line: `from examplegpt import GPT, GPTConfig, load_model, generate`.
"""

from .config import DataConfig, GenerateConfig, GPTConfig, TrainConfig
from .generate import generate
from .model import GPT
from .weights import load_model, save_model_file

__all__ = [
    "GPT",
    "GPTConfig",
    "DataConfig",
    "TrainConfig",
    "GenerateConfig",
    "load_model",
    "save_model_file",
    "generate",
]
__version__ = "0.1.0"
