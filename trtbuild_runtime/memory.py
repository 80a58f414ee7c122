"""What the KV pool costs and whether it fits: shared by the engine at load and by `trtbuild repo`,
which refuses a build whose pool cannot fit before anything is written. Torch-free."""

from __future__ import annotations

import os

CPU_USABLE = 0.8  # of the RAM available: the rest is the process, the tokenizer models and the OS


class OutOfMemory(ValueError):
    """The KV pool the configuration asks for does not fit the device; the message has the numbers."""


def kv_block_bytes(num_layers: int, page_size: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    return 2 * num_layers * page_size * kv_heads * head_dim * itemsize


def available_ram() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_cpu_pool(blocks: int, block_bytes: int, page_size: int) -> int:
    """How many blocks this machine's RAM holds; OutOfMemory when `blocks` do not fit."""
    ram = available_ram()
    fits = int(ram * CPU_USABLE) // block_bytes
    if blocks > fits:
        raise OutOfMemory(f"the KV cache needs {blocks:,} blocks of {page_size} tokens ({blocks * block_bytes / 2**30:.2f} GiB) "
                          f"but {ram / 2**30:.1f} GiB RAM available ({CPU_USABLE:.0%} usable) holds {fits:,}")
    return fits
