"""lora_jax: low-rank adaptation as a pure function transform for JAX."""

from lora_jax import arithmetic, losses, serving
from lora_jax._quantize import QuantizedArray, dequantize_tree, quantize
from lora_jax._spec import ALL_LINEAR, LoraSpec, path_to_str
from lora_jax._transform import MaterializationError, MaterializationWarning, RetraceWarning, wrap
from lora_jax._tree import LoraFactors, merge, split, unmerge

__version__ = "0.1.0"

__all__ = [
    "ALL_LINEAR",
    "LoraFactors",
    "LoraSpec",
    "MaterializationError",
    "MaterializationWarning",
    "QuantizedArray",
    "RetraceWarning",
    "arithmetic",
    "dequantize_tree",
    "losses",
    "merge",
    "path_to_str",
    "quantize",
    "serving",
    "split",
    "unmerge",
    "wrap",
]
