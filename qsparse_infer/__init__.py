"""qsparse-infer: a CUDA inference engine for Q-Sparse (BitNet b1.58 + top-K sparsity) language models."""
# Imported eagerly on purpose: the subpackage `qsparse_infer.convert` and the function share a name, and binding
# the function here, once, keeps `qsparse_infer.convert(...)` the function however the subpackage is imported later.
from .convert.hf import convert  # noqa: E402
from .engine import Engine  # noqa: E402
from .model.config import ModelConfig, SparsityConfig

__version__ = "0.1.0"
__all__ = ["Engine", "ModelConfig", "SparsityConfig", "convert", "__version__"]
