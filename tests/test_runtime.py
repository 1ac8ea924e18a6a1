"""runtime: the memory releaser of the inference loops."""

from __future__ import annotations

import pytest

from weaktr_cli import runtime
from weaktr_cli.runtime import FreedMemoryReleaser, resident_memory_bytes

MB = 1 << 20


class FakeProcess:
    """A resident size the test sets, and a malloc_trim that records calls and shrinks it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.size = 500 * MB
        self.trim_calls: list[int] = []
        monkeypatch.setattr(runtime, "_malloc_trim", lambda: self.trim)
        monkeypatch.setattr(runtime, "resident_memory_bytes", lambda: self.size)

    def trim(self, pad: int) -> int:
        self.trim_calls.append(pad)
        self.size = 400 * MB
        return 1


def test_releaser_trims_only_after_growth_beyond_the_slack(monkeypatch):
    process = FakeProcess(monkeypatch)
    release = FreedMemoryReleaser(slack_bytes=64 * MB)
    release()  # the first call only sets the reference size (500 MB)
    process.size = 560 * MB
    release()  # +60 MB: within the slack
    assert process.trim_calls == []
    process.size = 565 * MB
    release()  # +65 MB: trims
    assert process.trim_calls == [0]
    assert release.trims == 1 and release.reference == 500 * MB
    process.size = 520 * MB
    release()
    assert release.trims == 1


def test_releaser_without_malloc_trim_does_nothing(monkeypatch):
    monkeypatch.setattr(runtime, "_malloc_trim", lambda: None)
    release = FreedMemoryReleaser(slack_bytes=0)
    release()
    release()
    assert release.trims == 0 and release.reference is None


def test_resident_memory_is_read_on_linux():
    size = resident_memory_bytes()
    if size is None:
        pytest.skip("no /proc/self/statm here")
    assert 10 * MB < size < 64 * 1024 * MB
