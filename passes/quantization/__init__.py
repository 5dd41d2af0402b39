"""Quantization passes: simulated number formats (MASE's) and lowering to real kernels."""

from . import add_quantization_metadata, lower, mixed_precision, profile_statistics, quantize  # noqa: F401  (registration)
