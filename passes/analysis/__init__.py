"""Analysis passes: they only write metadata (roles, layers, shapes, FLOPs, ...)."""

from . import add_common_metadata, add_sparsity_metadata, hessian_sensitivity, init_metadata  # noqa: F401  (registration)
