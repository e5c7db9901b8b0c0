"""16 worker processes push 500 times each to one async server: nothing lost, nothing doubled.

The harness is benchmarks/bench_ps_reliability.py (the figures in RELIABILITY.md come
from the same code); this test checks correctness only, not speed. Each worker
deliberately sends every 25th push twice with the same sequence number.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_ps_reliability import run_load  # noqa: E402

WORKERS, PUSHES = 16, 500


def test_sixteen_processes_every_update_applied_exactly_once():
    r = run_load(WORKERS, PUSHES, resend_every=25, warmup=50)
    after, before, results = r["after"], r["before"], r["results"]
    total = WORKERS * PUSHES
    assert after["pushes_applied"] == after["version"] == total == 8000
    for res in results:  # each worker sees the version strictly increase
        v = res["versions"]
        assert len(v) == PUSHES and all(a < b for a, b in zip(v, v[1:], strict=False))
    # every update got its own version: 1..8000, each exactly once, across all workers
    assert sorted(x for res in results for x in res["versions"]) == list(range(1, total + 1))
    deliberate = sum(res["deliberate"] for res in results)
    resends = sum(res["resends"] for res in results)
    assert deliberate == WORKERS * (PUSHES // 25) and resends >= deliberate
    assert after["duplicates"] == resends  # each copy recognised, none applied
    assert after["requests"]["push"] == total + resends
    assert after["rejected"] == after["internal_errors"] == 0
    # the only replies that may find no one: a copy's or a ping's, after its client closed
    assert after["replies_dropped"] <= 2 * WORKERS
    growth = after["rss_bytes"] - before["rss_bytes"]
    assert growth < 16 * 2**20, f"server RSS grew by {growth / 2**20:.1f} MiB"
    print(f"\nload: {total} pushes from {WORKERS} processes applied exactly once, {resends} "
          f"resends recognised; {r['pushes_per_s']:.0f} pushes/s, p50 {r['p50_ms']:.1f} ms, "
          f"p99 {r['p99_ms']:.1f} ms; server RSS {before['rss_bytes'] / 2**20:.1f} -> "
          f"{after['rss_bytes'] / 2**20:.1f} MiB")
