"""Compact tensor storage for checkpoints: bit-packed bool masks and sparse weights.

Both stay plain safetensors entries (uint8 bit-fields and a 1-D tensor of values),
so the checkpoint's checksums cover them, and both unpack bit-identically: a weight
is stored sparsely by its bit pattern, so ``-0.0`` survives as a value.
"""

from __future__ import annotations

import torch

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}
# Store a weight sparsely only when that saves at least this share of its bytes.
MIN_SAVING = 0.1


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 tensor of ceil(n / 8) bytes, most significant bit first."""
    flat = flags.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return packed.unsqueeze(1).bitwise_and(_BIT_WEIGHTS).ne(0).reshape(-1)[:numel]


def pack_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Pack bool tensors as bits and mostly-zero float tensors as bitmask + values.

    Returns the tensors to write and, per packed name, how to unpack it.
    """
    out: dict[str, torch.Tensor] = {}
    packed: dict[str, dict] = {}
    for name, tensor in tensors.items():
        info = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        if tensor.dtype == torch.bool and tensor.numel() >= 64:
            out[f"{name}::bits"] = pack_bits(tensor)
            packed[name] = {**info, "kind": "bits"}
            continue
        int_dtype = _SAME_WIDTH_INT.get(tensor.dtype)
        if int_dtype is not None and tensor.numel() >= 1024:
            nonzero = tensor.reshape(-1).view(int_dtype) != 0
            kept = int(nonzero.sum())
            itemsize = tensor.element_size()
            if kept * itemsize + (tensor.numel() + 7) // 8 <= (1 - MIN_SAVING) * tensor.numel() * itemsize:
                out[f"{name}::bitmask"] = pack_bits(nonzero)
                out[f"{name}::values"] = tensor.reshape(-1)[nonzero].contiguous()
                packed[name] = {**info, "kind": "sparse"}
                continue
        out[name] = tensor
    return out, packed


def unpack_tensors(stored: dict[str, torch.Tensor], packed: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`pack_tensors`."""
    out = {name: t for name, t in stored.items() if "::" not in name}
    for name, info in packed.items():
        shape = info["shape"]
        numel = 1
        for size in shape:
            numel *= size
        dtype = getattr(torch, info["dtype"])
        if info["kind"] == "bits":
            out[name] = unpack_bits(stored[f"{name}::bits"], numel).reshape(shape)
        elif info["kind"] == "sparse":
            nonzero = unpack_bits(stored[f"{name}::bitmask"], numel)
            values = stored[f"{name}::values"]
            if values.dtype != dtype or int(nonzero.sum()) != values.numel():
                raise ValueError(f"packed tensor {name!r} is inconsistent: {values.numel()} values for {int(nonzero.sum())} non-zeros")
            dense = torch.zeros(numel, dtype=dtype)
            dense[nonzero] = values
            out[name] = dense.reshape(shape)
        else:
            raise ValueError(f"packed tensor {name!r} has unknown kind {info['kind']!r}")
    return out
