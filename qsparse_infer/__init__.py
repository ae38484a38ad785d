"""qsparse-infer: a CUDA inference engine for Q-Sparse (BitNet b1.58 + top-K sparsity) language models."""
from .config import ModelConfig, SparsityConfig

__version__ = "0.1.0"
__all__ = ["ModelConfig", "SparsityConfig", "__version__"]
