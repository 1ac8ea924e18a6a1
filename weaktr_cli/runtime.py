"""Where and how training and inference run: device, precision, seeds, torchrun (DDP).

Reproducibility lives here in one place: `seed_everything(seed, rank)` and
`configure_determinism()` make CPU runs bit-identical for a given seed and world size.
Distributed runs are configured from torchrun's environment variables only.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from weaktr_cli.errors import WeakTrError

#: "amp-fp16": fp16 autocast (with loss scaling when training) on CUDA, fp32 elsewhere: the
#: reference's CAM training and dump (torch.cuda.amp; softmax stays fp32 under autocast).
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "amp-fp16")


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" picks the local CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise WeakTrError(f"unknown device {name!r}",
                          hint="use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WeakTrError(f"device {name!r} requested but CUDA is not available",
                          hint="use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


@lru_cache(maxsize=1)
def cpu_bf16_is_fast() -> bool:
    """True when oneDNN has native bf16 kernels here (AVX512-BF16 or AMX), else bf16 is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device, *, training: bool) -> str:
    """Turn "auto" into a concrete precision for this device.

    auto: bf16 on CUDA when supported (fp16 otherwise); on CPU, bf16 for inference where the
    CPU has native bf16 (measured CAM error in benchmarks/bench_dump_cams.py), fp32 for training
    (bit-identical seeded runs matter more there than speed).
    """
    if precision not in PRECISIONS:
        raise WeakTrError(f"unknown precision {precision!r}", hint=f"use {', '.join(PRECISIONS)}")
    if precision == "amp-fp16":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise WeakTrError("fp16 autocast is for CUDA", hint="use bf16 or fp32 on the CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if (not training and cpu_bf16_is_fast()) else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """An autocast context for a resolved precision ("fp32" gives a null context)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch; each rank gets its own stream (seed + rank)."""
    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool = True) -> None:
    """Deterministic kernels (CPU is deterministic already; this pins CUDA/cuDNN choices)."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_info_from_env() -> DistInfo:
    """Rank and world size as torchrun sets them (RANK, WORLD_SIZE, LOCAL_RANK)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


@contextlib.contextmanager
def distributed(device_name: str = "auto") -> Iterator[tuple[DistInfo, torch.device]]:
    """Join torchrun's process group if there is one (gloo on CPU, nccl on CUDA), then leave."""
    info = dist_info_from_env()
    device = select_device(device_name, info.local_rank)
    if not info.enabled:
        yield info, device
        return
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield info, device
    finally:
        dist.destroy_process_group()


@lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


def resident_memory_bytes() -> int | None:
    """This process's resident set size now (Linux `/proc/self/statm`), or None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


class FreedMemoryReleaser:
    """Hand memory that Python and torch have freed back to the OS (glibc `malloc_trim`), but
    only once the process has grown: call it after every batch of a long inference loop.

    Per-image inference loops allocate and free many large, differently sized buffers; glibc
    keeps the freed pages in its heaps, so the resident size of `dump-cams` grew with the
    number of images (measured: DeiT-Ti at 500x375, peak RSS 2.0 GB for 50 images, 7.6 GB for
    500) while nothing was referenced. Trimming after every batch kept it flat but cost a third
    of the throughput on small images (the trimmed pages are faulted back in by the next
    batch). So the size after the first call is the reference, and a call trims only when the
    process has grown `slack_bytes` beyond it: memory stays bounded, and a loop that does not
    grow never pays. Without `malloc_trim` (not glibc) or `/proc` it does nothing.
    """

    def __init__(self, slack_bytes: int = 64 << 20) -> None:
        self.slack_bytes = slack_bytes
        self.reference: int | None = None
        self.trims = 0

    def __call__(self) -> None:
        trim = _malloc_trim()
        size = None if trim is None else resident_memory_bytes()
        if size is None:
            return
        if self.reference is None:
            self.reference = size
        elif size > self.reference + self.slack_bytes:
            trim(0)
            self.trims += 1
