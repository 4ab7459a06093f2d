"""bench/gpu.py without a GPU: `--help`, and `--dry-run`, which runs the whole harness (parent, one
process per contestant and shape, the bare loop and Lathe's real trainer, the report) on tiny shapes
on the CPU. Nothing about speed is asserted: only that every measurement exists and is positive."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.conftest import ENV, ROOT

BENCH = ROOT / "bench" / "gpu.py"


def run_bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def test_help_exits_0_and_names_the_flags():
    out = run_bench("--help", timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--models", "--steps", "--dry-run", "--json"):
        assert flag in out.stdout


def test_unknown_model_is_refused():
    out = run_bench("--models", "sd3", timeout=60)
    assert out.returncode == 2 and "--models" in out.stderr


def test_dry_run_reports_both_contestants_for_every_shape(tmp_path):
    path = tmp_path / "out.json"
    out = run_bench("--dry-run", "--json", str(path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(path.read_text())
    assert report["dry_run"] is True and report["device"] and report["steps"] >= 1
    assert [s["model"] for s in report["shapes"]] == ["sd15", "sdxl"]
    for shape in report["shapes"]:
        assert shape["flops_per_step"] > 0
        for kind in ("bare", "lathe"):
            r = shape[kind]
            assert "error" not in r, r
            assert r["contestant"] == kind and r["timed_steps"] == report["steps"]
            assert r["step_s"] > 0 and r["images_per_s"] > 0 and r["peak_rss_mb"] > 0
            assert math.isfinite(r["final_loss"])
        assert shape["lathe_over_bare"]["step_s"] > 0
    assert out.stdout.count("lathe/bare") == len(report["shapes"])
