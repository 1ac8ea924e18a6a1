"""SIGKILL a writer at random points, rerun it: always the clean run's artifact (14.4, 14.18).

The writer is `make_seeds` (what `weaktr crf` runs) on the tiny dataset of `tests/_tiny_data`,
with the dense CRF, in a child process. Each round kills it twice (the second time while it
resumes), each time once the journal holds a random number of images and after a random extra
delay (so kills land inside flushes too), then reruns it to the end and compares the file byte
for byte with an uninterrupted run's.

`WEAKTR_KILL_ROUNDS` sets the rounds (default 12: 24 kills, about a minute on a quiet machine).
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
ROUNDS = int(os.environ.get("WEAKTR_KILL_ROUNDS", "12"))
IMAGES = 10
DRIVER = f"""
from pathlib import Path
from tests._tiny_data import TinyDataset, write_tiny_cams
from weaktr_cli.crf import get_preset
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


def _finish(folder: Path) -> None:
    child = _start(folder)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err.decode()


def _journal_lines(folder: Path) -> int:
    try:
        return (folder / "seeds.h5.journal").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _kill_at_random(folder: Path, rng: random.Random) -> bool:
    """Start the writer and SIGKILL it after a random number of images; True when it died
    mid-run (False: it finished first)."""
    target = rng.randrange(IMAGES)
    child = _start(folder)
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        if (folder / "seeds.h5.lock").exists() and _journal_lines(folder) >= target:
            time.sleep(rng.uniform(0, 0.01))
            break
        time.sleep(0.001)
    alive = child.poll() is None
    child.send_signal(signal.SIGKILL)
    child.wait()
    return alive


def test_sigkill_at_random_points_then_rerun_equals_a_clean_run(tmp_path: Path) -> None:
    work = tmp_path  # one folder: the recorded paths of the inputs are equal too
    _finish(work)
    clean = (work / "seeds.h5").read_bytes()
    rng = random.Random(int(os.environ.get("WEAKTR_KILL_SEED", "14")))
    killed_mid_run = 0
    for round_ in range(ROUNDS):
        (work / "seeds.h5").unlink(missing_ok=True)
        killed_mid_run += _kill_at_random(work, rng)
        killed_mid_run += _kill_at_random(work, rng)  # this one resumes the first
        _finish(work)
        assert (work / "seeds.h5").read_bytes() == clean, f"round {round_}"
        assert sorted(p.name for p in work.iterdir()) == ["cams.h5", "seeds.h5"]
    assert killed_mid_run >= 1.5 * ROUNDS, killed_mid_run
    print(f"{ROUNDS} rounds, {killed_mid_run} kills mid-run, every rerun equal to the clean run")
