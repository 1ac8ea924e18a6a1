"""SIGKILL a writer at random points, rerun it: always the clean run's artifact (14.4, 14.18).

The writer is `make_seeds` (what `weaktr crf` runs) on the tiny dataset of `tests/_tiny_data`,
with the dense CRF, in a child process. Each round kills it twice (the second time while it
resumes), at a random moment of its writing phase (from the `.partial` file's appearance to the
end of the run, measured on an uninterrupted run), so kills land between images and inside
flushes alike; then it reruns the writer to the end and compares the file byte for byte with the
uninterrupted run's.

`WEAKTR_KILLS` sets how many kills must land mid-run (default 20: about ten rounds, a minute on a
quiet machine).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KILLS = int(os.environ.get("WEAKTR_KILLS", "20"))
IMAGES = 10
DRIVER = f"""
from pathlib import Path
from tests._tiny_data import TinyDataset, write_tiny_cams
from weaktr_cli.dense_crf import get_preset
from weaktr_cli.seeds import make_seeds
data = TinyDataset(n={IMAGES})
cams = Path("cams.h5")
if not cams.exists():
    write_tiny_cams(cams, data)
make_seeds(cams, data, "seeds.h5", bg=0.4, params=get_preset("voc"))
"""


def _start(folder: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SOURCE_DATE_EPOCH": "1700000000"}
    return subprocess.Popen([sys.executable, "-c", DRIVER], cwd=folder, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_partial(folder: Path, child: subprocess.Popen[bytes]) -> float:
    """Poll until the writer's `.partial` file appears; the time it appeared."""
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        if (folder / "seeds.h5.partial").exists():
            break
        time.sleep(0.0005)
    return time.monotonic()


def _finish(folder: Path) -> float:
    """Run the writer to the end; seconds from its `.partial` file's appearance to its exit."""
    child = _start(folder)
    started = _wait_for_partial(folder, child)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err.decode()
    return time.monotonic() - started


def _kill_at_random(folder: Path, rng: random.Random, writing: float) -> bool:
    """Start the writer and SIGKILL it a random time into its writing phase; True when it
    died mid-run (False: it finished first)."""
    child = _start(folder)
    _wait_for_partial(folder, child)
    time.sleep(rng.uniform(0, writing))
    alive = child.poll() is None
    child.send_signal(signal.SIGKILL)
    child.wait()
    return alive


def test_sigkill_at_random_points_then_rerun_equals_a_clean_run(tmp_path: Path) -> None:
    work = tmp_path  # one folder: the recorded paths of the inputs are equal too
    writing = _finish(work)
    clean = (work / "seeds.h5").read_bytes()
    rng = random.Random(int(os.environ.get("WEAKTR_KILL_SEED", "14")))
    killed_mid_run = rounds = 0
    while killed_mid_run < KILLS and rounds < 3 * KILLS:
        (work / "seeds.h5").unlink(missing_ok=True)
        killed_mid_run += _kill_at_random(work, rng, writing)
        # The second run resumes the first, so it has less left to write.
        killed_mid_run += _kill_at_random(work, rng, writing / 2)
        _finish(work)
        assert (work / "seeds.h5").read_bytes() == clean, f"round {rounds}"
        assert sorted(p.name for p in work.iterdir()) == ["cams.h5", "seeds.h5"]
        rounds += 1
    assert killed_mid_run >= KILLS, killed_mid_run
    print(f"{rounds} rounds, {killed_mid_run} kills mid-run, every rerun equal to the clean run")
