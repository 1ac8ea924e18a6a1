"""What a measurement needs to be read later: the machine, its CPU kind and the versions.

`weaktr pipeline` writes these into `metrics.json` and the benchmarks into their JSON records,
so every figure says where it was measured. The CPU kind matters most: bf16 matmuls are native
(fast) only with AVX512-BF16 or AMX and emulated (slower than fp32) elsewhere, so recipes and
timings differ between the two kinds. Importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import sys
from typing import Any

from weaktr_cli import __version__

_PACKAGES = ("torch", "timm", "numpy", "h5py", "pydensecrf2", "onnxruntime")


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 9R14 ..."), or the architecture when unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU feature flags of the first core (Linux), else an empty set."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (imports torch: call it where torch is loaded)."""
    from weaktr_cli.runtime import cpu_bf16_is_fast

    return cpu_bf16_is_fast()


def machine(*, with_torch: bool = True) -> dict[str, Any]:
    """The machine a measurement ran on: CPU model, cores, bf16 kind, load at the time."""
    flags = cpu_flags()
    record: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": _cores(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "platform": platform.platform(),
    }
    if with_torch:
        import torch

        record["native_bf16"] = native_bf16()
        record["torch_threads"] = torch.get_num_threads()
    with contextlib.suppress(OSError):
        record["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return record


def _cores() -> int | None:
    """Cores this process may run on (its affinity), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def versions() -> dict[str, str | None]:
    """weaktr, Python and the installed versions of the packages that shape the numbers."""
    found: dict[str, str | None] = {"weaktr": __version__, "python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found
