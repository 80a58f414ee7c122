"""What this CPU's integer kernels can do, for choosing how ONNX Runtime quantizes to INT8.

ONNX Runtime's U8S8 matmul (uint8 activations x int8 weights) on AVX2 / AVX-512 without VNNI
sums pairs of products into 16 bits (vpmaddubsw), which saturates: an int8 export then loses
most of its accuracy there (top-1 0.25 on the tiny Llama, measured on an AMD EPYC with AVX2).
With VNNI (or AMX) the products accumulate in 32 bits and U8S8 is exact; without it, U8U8
(uint8 weights) takes a path that does not saturate. The choice is recorded in export.json,
because an export quantized one way runs on every x86 CPU but is only exact where it was chosen.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path

EXACT_U8S8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
OVERRIDE = "TRTBUILD_INT8_KERNEL"  # u8s8 or u8u8: quantize for another CPU than this one


@dataclasses.dataclass(frozen=True)
class Int8Kernels:
    weights: str  # "int8" (U8S8) or "uint8" (U8U8)
    reason: str


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def int8_kernels(flags: set[str] | None = None, machine: str | None = None) -> Int8Kernels:
    forced = os.environ.get(OVERRIDE, "").lower()
    if forced in ("u8s8", "u8u8"):
        return Int8Kernels("int8" if forced == "u8s8" else "uint8", f"{OVERRIDE}={forced}")
    machine = machine or platform.machine()
    if machine not in ("x86_64", "AMD64", "i686"):
        return Int8Kernels("int8", f"{machine}: integer dot products do not saturate")
    flags = cpu_flags() if flags is None else flags
    exact = sorted(set(EXACT_U8S8_FLAGS) & flags)
    if exact:
        return Int8Kernels("int8", f"this CPU has {', '.join(exact)}: U8S8 accumulates in 32 bits")
    return Int8Kernels("uint8", "this CPU has no VNNI/AMX: U8S8 would saturate, U8U8 does not")
