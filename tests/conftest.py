"""Shared fixtures: the real sample data beside the repo, and an isolated cache per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests._registry_entries import register_test_entries

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

register_test_entries()  # the `micro` backbone and the `smoke` recipe exist for tests only


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never touch the user's ~/.cache; the built-in dataset is generated once per run."""
    if "WEAKTR_TEST_CACHE" in os.environ:  # reuse between local runs
        os.environ["WEAKTR_CACHE"] = os.environ["WEAKTR_TEST_CACHE"]
    else:
        os.environ["WEAKTR_CACHE"] = str(tmp_path_factory.mktemp("weaktr-cache"))
    os.environ.pop("WEAKTR_DATA_ROOT", None)


@pytest.fixture(scope="session")
def voc_sample() -> Path:
    root = SHARED_DATA / "voc_sample" / "VOC2012"
    if not root.is_dir():
        pytest.skip(f"real VOC samples not found at {root} (../shared/data beside the repo)")
    return root


@pytest.fixture(scope="session")
def coco_sample() -> Path:
    root = SHARED_DATA / "coco_sample"
    if not root.is_dir():
        pytest.skip(f"real COCO samples not found at {root} (../shared/data beside the repo)")
    return root


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread (tiny models: threads only add overhead and noise)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
