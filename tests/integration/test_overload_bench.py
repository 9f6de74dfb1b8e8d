"""The overload benchmark's short version: `make serve`'s service (its own Ray), 3x capacity for 10 s.

Not a timed test: it fails when the service does not shed. Without admission control a 3x flood makes requests
wait until the client gives up (the issue measured p50 24 s, no 429/503 at all), so the checks below that need
only shedding are strict: nothing runs past the client's timeout, every non-200 is a clean 503/429 with
Retry-After in the native shape, the other key is served. The figures that depend on how many cores the
machine has free (goodput, refusal p99) get the margins that CI's shared 2 cores need; `load_tests/README.md`
has the full benchmark's figures against the issue's thresholds.
"""

from __future__ import annotations

import asyncio

import pytest

from load_tests import bench_overload

pytestmark = pytest.mark.slow


def test_three_times_capacity_for_ten_seconds_is_shed_cleanly(tmp_path):
    args = bench_overload.parse_args([
        "--levels", "3", "--duration", "10", "--capacity-s", "10", "--warmup-s", "5", "--recovery-s", "6",
        "--client-timeout", "10", "--other-share", "0.15", "--state-dir", str(tmp_path / "state"),
    ])
    url, proc = bench_overload.start_service(args)
    try:
        capacity, levels = asyncio.run(bench_overload.run(args, url))
    finally:
        bench_overload.stop_service(proc)
    fig = levels[0]
    print(f"capacity {capacity['capacity_rps']:.1f} req/s, p99 {capacity['p99']:.3f} s; 3x: {fig['counts']}, "
          f"goodput {fig['goodput_ratio']:.0%}, admitted p99 {fig['admitted_p99']}, refusal p99 {fig['refused_p99']}, "
          f"other key {fig['other_ok']}/{fig['other_sent']} p99 {fig['other_p99']}, recovery {fig['recovery_s']} s")
    assert fig["over_timeout"] == 0, fig["counts"]  # nobody waited out the client
    assert fig["clean_refusals"], fig["counts"]  # 503/429 with Retry-After, native error shape
    assert set(fig["counts"]) <= {"200", "429", "503"}, fig["counts"]
    assert fig["counts"].get("503", 0) + fig["counts"].get("429", 0) > 0  # it did shed
    # the other key is not starved. It asks for 15 % of the measured capacity, well under its half, on any machine:
    # a fixed 2 requests/s is 30 % of a slow CI runner's 6.7 requests/s, and Poisson bursts then take it past its
    # fair share of the slots with a request already waiting, which the admission rule refuses by design
    # (serve_app/core/admission.py). At most one refusal for such a burst; the full benchmark at 3x: 56 of 56
    assert fig["other_sent"] > 0 and fig["other_ok"] >= fig["other_sent"] - 1, fig["other_counts"]
    assert fig["goodput_ratio"] >= 0.5, fig  # the bar is 0.9: load_tests/README.md has what 2 cores reach
    assert fig["admitted_p99"] <= 3 * capacity["p99"], (fig["admitted_p99"], capacity["p99"])
    assert fig["recovery_s"] is not None and fig["recovery_s"] <= 5.0
