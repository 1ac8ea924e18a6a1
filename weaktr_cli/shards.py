"""`--shard K/N`: split per-image work across processes or machines.

Shard K of N (1-based) takes every N-th id starting at the K-th, so shards are balanced and
their union, merged with `weaktr merge`, is the whole split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from weaktr_cli.errors import WeakTrError

T = TypeVar("T")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """Parse "K/N" into (K, N) with 1 <= K <= N; None stays None."""
    if text is None:
        return None
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise WeakTrError(f"invalid shard {text!r}", hint="write K/N, e.g. --shard 2/4") from None
    if not 1 <= k <= n:
        raise WeakTrError(f"invalid shard {text!r}: K must be in 1..N", hint="e.g. --shard 1/4")
    return k, n


def select_shard(items: Sequence[T], shard: tuple[int, int] | None) -> list[T]:
    """The items of shard (K, N): items[K-1], items[K-1+N], ...; all items when shard is None."""
    if shard is None:
        return list(items)
    k, n = shard
    return list(items[k - 1 :: n])
