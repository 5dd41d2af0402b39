"""What this CPU gives int8 and bf16 kernels: its flags, the ISA oneDNN will dispatch to, the int8 scheme.

oneDNN (the kernels inductor's int8 and fp32 paths call) picks its code from the CPU's
features, capped by ``ONEDNN_MAX_CPU_ISA`` (legacy name ``DNNL_MAX_CPU_ISA``) when set;
the variable is read once, at the first kernel, so it only takes effect in a fresh
process. Its levels are partially ordered (oneDNN's dispatcher-control guide):
``SSE41 < AVX < AVX2 < AVX2_VNNI < AVX2_VNNI_2``; ``AVX2 < AVX512_CORE <
AVX512_CORE_VNNI < AVX512_CORE_BF16 < AVX10_1_512 < AVX10_1_512_AMX <
AVX10_1_512_AMX_FP16``; ``AVX2_VNNI < AVX10_1_512``.

Why the int8 scheme depends on it: with VNNI (``vpdpbusd``) or AMX, u8 x s8 products
accumulate straight into int32. Without it oneDNN multiplies with ``vpmaddubsw``, which
adds each pair of u8 x s8 products into an int16 that saturates (255 * 127 * 2 > 32767),
so a kernel on 8-bit activations is not the arithmetic it claims. 7-bit activations
(0..127, "reduce_range" as ONNX Runtime's and torchao's guides call it and advise for such CPUs)
keep every pair within int16 (127 * 128 * 2 = 32512), and so do 7-bit weights (-64..63:
255 * 64 * 2 = 32640): exact again, at a small cost in resolution.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from functools import lru_cache

ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")

# oneDNN's ISA levels, lowest first: name -> (the Linux flags it needs, the levels it includes).
_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
ISA_LEVELS: dict[str, tuple[set[str], set[str]]] = {
    "sse41": ({"sse4_1"}, set()),
    "avx": ({"avx"}, {"sse41"}),
    "avx2": ({"avx2"}, {"sse41", "avx"}),
    "avx2_vnni": ({"avx2", "avx_vnni"}, {"sse41", "avx", "avx2"}),
    "avx2_vnni_2": ({"avx2", "avx_vnni", "avx_vnni_int8"}, {"sse41", "avx", "avx2", "avx2_vnni"}),
    "avx512_core": (_AVX512, {"sse41", "avx", "avx2"}),
    "avx512_core_vnni": (_AVX512 | {"avx512_vnni"}, {"sse41", "avx", "avx2", "avx512_core"}),
    "avx512_core_bf16": (_AVX512 | {"avx512_vnni", "avx512_bf16"}, {"sse41", "avx", "avx2", "avx512_core", "avx512_core_vnni"}),
    "avx10_1_512": (
        _AVX512 | {"avx512_vnni", "avx512_bf16", "avx512_fp16"},
        {"sse41", "avx", "avx2", "avx2_vnni", "avx512_core", "avx512_core_vnni", "avx512_core_bf16"},
    ),
    "avx10_1_512_amx": (
        _AVX512 | {"avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16"},
        {"sse41", "avx", "avx2", "avx2_vnni", "avx512_core", "avx512_core_vnni", "avx512_core_bf16", "avx10_1_512"},
    ),
}
# How oneDNN names each level in its verbose log ("info,cpu,isa:..."), to check our reading against its own.
ONEDNN_NAMES = {
    "sse41": "Intel SSE4.1",
    "avx": "Intel AVX",
    "avx2": "Intel AVX2",
    "avx2_vnni": "Intel AVX2 with Intel DL Boost",
    "avx512_core": "Intel AVX-512 with AVX512BW, AVX512VL, and AVX512DQ extensions",
    "avx512_core_vnni": "Intel AVX-512 with Intel DL Boost",
    "avx512_core_bf16": "Intel AVX-512 with Intel DL Boost and bfloat16 support",
}
ISA_ALIASES = {"avx512_core_fp16": "avx10_1_512", "avx512_core_amx": "avx10_1_512_amx"}
INT8_ACCUMULATING = {"avx2_vnni", "avx2_vnni_2", "avx512_core_vnni", "avx512_core_bf16", "avx10_1_512", "avx10_1_512_amx"}
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # AVX-512 BF16, AMX, Arm's BF16

# The int8 schemes ``lower`` knows: unsigned activation and signed weight ranges. A kernel
# without VNNI/AMX adds two products a * w into an int16, so a scheme is exact there when
# 2 * activation_max * max|w| <= 32767: u7s8 (activations 0..127, torchao's and ONNX
# Runtime's "reduce_range") and u8s7 (weights -64..63) are; u8s8 is not (65280).
SCHEMES = {
    "u8s8": {"activations": (0, 255), "weights": (-128, 127)},
    "u7s8": {"activations": (0, 127), "weights": (-128, 127)},
    "u8s7": {"activations": (0, 255), "weights": (-64, 63)},
}
INT16_MAX = 32767
# Which exact scheme a CPU without int32 accumulation gets, chosen by measurement on the
# fine-tuned MiniLM (bench/int8_isa.py; README, Quantization): 7-bit weights (per channel)
# lose far less than 7-bit activations (per tensor): logits 0.07 from fp32 (relative RMS,
# about as close as u8s8) against 0.14-0.15 for u7s8, at the same speed.
NON_VNNI_SCHEME = "u8s7"


def pair_sum_bound(scheme: str) -> int:
    """The largest |a1 w1 + a2 w2| a scheme's values can make: what an int16 pair sum must hold."""
    low, high = SCHEMES[scheme]["weights"]
    return 2 * SCHEMES[scheme]["activations"][1] * max(-low, high)


@lru_cache(maxsize=1)
def _proc_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty where unknown)."""
    return set(_proc_flags())


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def isa_cap() -> str | None:
    """The ISA cap set by ``ONEDNN_MAX_CPU_ISA`` (lower-case, aliases resolved), or None for none."""
    for name in ISA_ENV:
        value = os.environ.get(name, "").strip().lower()
        if value:
            if value in ("default", "all"):
                return None
            return ISA_ALIASES.get(value, value)
    return None


def _allowed(level: str, cap: str | None) -> bool:
    if cap is None:
        return True
    if cap not in ISA_LEVELS:  # a newer level than we know: everything we know is below it
        return True
    return level == cap or level in ISA_LEVELS[cap][1]


def onednn_isa(flags: set[str] | None = None) -> str | None:
    """The highest oneDNN ISA level this CPU has and the cap allows, e.g. ``"avx512_core_vnni"``.

    None on a CPU that is not x86-64 or has not even SSE4.1 (as far as Linux tells).
    """
    if not is_x86_64():
        return None
    flags = cpu_flags() if flags is None else flags
    cap = isa_cap()
    usable = [level for level, (needs, _) in ISA_LEVELS.items() if needs <= flags and _allowed(level, cap)]
    # The order is partial (AVX2_VNNI and AVX512_CORE are not comparable): the level that includes most wins.
    return max(usable, key=lambda level: len(ISA_LEVELS[level][1]), default=None)


def int8_accumulates_in_int32(isa: str | None = None) -> bool:
    """Whether oneDNN's u8 x s8 kernels accumulate in int32 here (VNNI or AMX usable at this ISA level)."""
    isa = onednn_isa() if isa is None else isa
    return isa in INT8_ACCUMULATING


def int8_scheme(isa: str | None = None) -> str:
    """The int8 scheme ``lower`` uses at this ISA: ``"u8s8"`` with VNNI/AMX, else the exact ``NON_VNNI_SCHEME``."""
    return "u8s8" if int8_accumulates_in_int32(isa) else NON_VNNI_SCHEME


def exact_at(scheme: str, isa: str | None = None) -> bool:
    """Whether oneDNN's int8 kernels compute ``scheme`` exactly at this ISA (no int16 saturation)."""
    return int8_accumulates_in_int32(isa) or pair_sum_bound(scheme) <= INT16_MAX


def native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX-512 BF16, AMX, or Arm's BF16), the ISA cap allowing."""
    flags = cpu_flags()
    if not BF16_FLAGS & flags:
        return False
    if not is_x86_64():
        return True
    isa = onednn_isa(flags)
    return isa in ("avx512_core_bf16", "avx10_1_512", "avx10_1_512_amx")


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            name = next((l.split(":", 1)[1].strip() for l in handle if l.startswith("model name")), name)
    except OSError:
        pass
    return name


@lru_cache(maxsize=1)
def dispatched_isa() -> str | None:
    """The ISA oneDNN itself reports it dispatches to, asked in a fresh process (same environment).

    oneDNN prints it once, in its verbose log, at its first kernel; the answer is
    None where torch has no oneDNN or the child fails.
    """
    code = (
        "import torch; w = torch.randn(4, 3, 3, 3); "
        "torch.mkldnn_convolution(torch.randn(1, 3, 8, 8), w, None, [0, 0], [1, 1], [1, 1], 1)"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "ONEDNN_VERBOSE": "all"},
            capture_output=True, text=True, timeout=120,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in done.stdout.splitlines():
        if ",info,cpu,isa:" in line:
            return line.split("isa:", 1)[1].strip()
    return None


def cpu_description(ask_onednn: bool = False) -> dict:
    """The CPU, its int8/bf16 flags, the ISA level and int8 scheme ``lower`` picks; for benchmark headers.

    With ``ask_onednn`` also what oneDNN reports it dispatches to (a child process, about a second).
    """
    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    isa = onednn_isa(flags)
    description = {
        "cpu": cpu_name(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "flags": [f for f in wanted if f in flags],
        "isa_cap": isa_cap(),
        "onednn_isa": isa,
        "int8_scheme": int8_scheme(isa) if isa else None,
        "native_bf16": native_bf16(),
    }
    if ask_onednn:
        description["onednn_dispatched"] = dispatched_isa()
    return description


def describe_line(description: dict) -> str:
    """One line for the top of a benchmark's output."""
    cap = f" (capped by ONEDNN_MAX_CPU_ISA={description['isa_cap']})" if description.get("isa_cap") else ""
    dispatched = description.get("onednn_dispatched")
    return (
        f"CPU: {description['cpu']}, {description['cores']} cores, flags {' '.join(description['flags']) or '-'}; "
        f"oneDNN ISA {description['onednn_isa']}{cap}"
        + (f" (oneDNN says: {dispatched})" if dispatched else "")
        + f"; int8 scheme {description['int8_scheme']}; native bf16 {'yes' if description['native_bf16'] else 'no'}"
    )
