"""bench/gpu.py without a GPU: `--help`, and `--dry-run`, which runs the whole harness (parent, one
process per contestant and shape, the bare loop and Lathe's real trainer, the report) on tiny shapes
on the CPU; for the flow families (`--models flux,sd35`) Lathe's trainer under each memory lever.
Nothing about speed is asserted: only that every measurement exists and is positive."""

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
    out = run_bench("--models", "sd3", timeout=60)  # the SD3.5 shape is sd35
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


def test_dry_run_of_the_flow_families_measures_every_memory_lever(tmp_path):
    path = tmp_path / "flow.json"
    out = run_bench("--dry-run", "--models", "flux,sd35", "--json", str(path), timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(path.read_text())
    assert report["dry_run"] is True and report["shapes"] == [] and report["flow_steps"] >= 1
    assert [f["model"] for f in report["levers"]] == ["flux", "sd35"]
    for fam in report["levers"]:
        bare = fam["bare"]
        assert "error" not in bare, bare
        assert bare["step_s"] > 0 and fam["flops_per_step"] > 0 and math.isfinite(bare["final_loss"])
        assert fam["lathe_over_bare"]["step_s"] > 0
        keys = [lv["key"] for lv in fam["levers"]]
        assert keys[:3] == ["bf16", "checkpointing", "fp8_base"] and all(k.startswith("swap") for k in keys[3:])
        assert len(keys) == 5
        for lv in fam["levers"]:
            r = lv["lathe"]
            assert "error" not in r, (lv["key"], r)
            assert r["contestant"] == "lathe" and r["lever"] == lv["key"] and r["timed_steps"] == report["flow_steps"]
            assert r["step_s"] > 0 and r["images_per_s"] > 0 and r["peak_rss_mb"] > 0 and math.isfinite(r["final_loss"])
            assert lv["vs_bf16"]["step_s"] > 0
            assert lv["label"] in out.stdout, lv["label"]  # the table names each lever
        settings = {lv["key"]: lv["settings"] for lv in fam["levers"]}
        assert settings["bf16"] == {} and settings["fp8_base"] == {"training.gradient_checkpointing": True,
                                                                   "model.fp8_base": True}
        assert all(settings[k]["training.blocks_to_swap"] > 0 for k in keys[3:])
    assert "Flux.1-dev" in out.stdout and "SD3.5 large" in out.stdout
    assert "lathe/bare" not in out.stdout  # that line is the SD shapes' (one per shape)
