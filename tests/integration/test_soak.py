"""The soak benchmark's 3-minute version: mixed traffic on every front door at ~0.7x capacity, with an encoder or a
decoder replica SIGKILLed every 40 s (2 replicas each), and not one error.

It runs `load_tests/soak.py` as a user would, in a process of its own with its own Ray cluster (so it runs before
the session's cluster is up, tests/conftest.py). The retry is what it tests: with `SAM3_FAILOVER_RETRIES=0` in the
environment the same run fails (the kills fail the requests the dead replica was serving). The 30-minute run and
its figures are in docs/operations.md ("Failures").

What it counts is failover, so it widens the admission bound (SAM3_ADMISSION_MAX_WAIT_S) from 0.5 s to 5 s. The
load is 0.6x of a capacity measured on a shared 2-core machine, and a neighbour's burst of CPU takes the capacity
under the load for seconds at a time: admission then sheds by design (a clean 503 with Retry-After, which
test_overload_bench.py checks), and the soak would count those as errors. Reproduced here with a process that
spins one core for 10 s out of every 20: 93 such 503s at the 0.5 s bound.

So that each kill meets requests in flight, the embedding cache holds 2 of the 8 images (the encoder works all
along, not only until every image is cached), and each kill follows a burst of 6 requests and waits until the
victim is seen burning CPU. Without that, kills of idle replicas made the run pass with SAM3_FAILOVER_RETRIES=0.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_three_minutes_of_mixed_traffic_with_a_model_replica_killed_every_40_s_fail_nothing(tmp_path):
    retries = os.environ.get("SAM3_FAILOVER_RETRIES", "3")  # 0 shows that the test fails without the retry
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "load_tests/soak.py", "--minutes", "3", "--kill-every", "40", "--window", "60",
         "--rss-every", "30", "--warmup-min", "1", "--capacity-s", "10", "--load", "0.5", "--retries", retries,
         "--admission-max-wait-s", "5", "--cache-entries", "2", "--kill-burst", "6",
         "--state-dir", str(tmp_path / "state"), "--check"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=480,
    )
    # the run's ending first (its totals, error lines and verdict), then the whole log
    tail = proc.stdout[proc.stdout.rfind("total: "):] if "total: " in proc.stdout else ""
    out = tail + "\n--- the whole run ---\n" + proc.stdout + proc.stderr[-3000:]
    print(proc.stdout)
    assert "SIGKILL ImageEncoder" in proc.stdout and "SIGKILL Decoder" in proc.stdout, out
    assert "verdict: PASSED" in proc.stdout and proc.returncode == 0, out
