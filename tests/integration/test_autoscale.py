"""Autoscaling under load (load_tests/autoscale.py): ingress and encoder scale up, then back down; no 5xx.

The script runs in its own process with its own Ray cluster (`address="local"`, own temp dir), Serve proxy on a
free loopback port and headless Locust, so the suite's in-process cluster is untouched. It ramps 2 -> 8 -> 16
users over 85 s against the graph with SAM3_AUTOSCALE on (max 2 replicas, target 2 ongoing requests, 2 s / 5 s
delays, 15 s look-back), each request a box prompt on a distinct 1080x1920 JPEG (the encoder's share of the work is
the largest, as on a real model), polls `serve.status()` every second and then watches the replicas go back to
one. About 2.5 minutes on 2 idle cores. `--no-autoscale` (fixed single replicas) is the broken case: its verdict
fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# found, not imported: importing locust monkey-patches this whole process with gevent (it only runs in the script)
if importlib.util.find_spec("locust") is None:
    pytest.skip("Locust is not installed: `pip install -e '.[load]'` (make test installs it)", allow_module_level=True)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.autoscale  # make test-autoscale runs it alone
def test_ingress_and_encoder_scale_up_under_load_and_back_down(tmp_path):
    out = tmp_path / "autoscale.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "load_tests/autoscale.py", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False, timeout=480)
    print(proc.stdout[-6000:])
    print(f"autoscale load test took {time.monotonic() - began:.0f} s")
    assert out.exists(), proc.stderr[-4000:]
    result = json.loads(out.read_text())
    verdict = result["verdict"]
    assert result["requests"] > 100, result["codes"]  # the load really ran
    assert verdict["zero_5xx_or_errors"], result["codes"]
    assert verdict["429_only_at_max"], result["codes"]
    assert verdict["ingress_scaled_up"] and verdict["encoder_scaled_up"], result["replica_changes"]
    assert verdict["scaled_back_down"], result["replica_changes"]
    assert all(n <= result["max_replicas"] for n in result["peak_replicas"].values()), result["peak_replicas"]
    assert proc.returncode == 0, proc.stderr[-4000:]
