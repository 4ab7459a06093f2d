"""Two-process CPU DDP of the demo through the real launcher (`accelerate launch --multi_gpu` with
ACCELERATE_USE_CPU): ranks stay in sync, rank 0 alone writes, data is sharded, resume is exact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from backend import launcher, process_tree, runs
from tests.conftest import ROOT, events, run_cli
from tests.lifecycle_helpers import alive, demo_cfg, wait_steps
from tests.trainer_probe import PROBE_ENTRY, start_probed

pytestmark = pytest.mark.train



@pytest.fixture(scope="module")
def ddp_run(demo, tmp_path_factory) -> Path:
    """The demo on 2 CPU processes: 2 epochs, a save per epoch, one sample at the end; the text encoder
    trains too, under network dropout, with clip_skip 2 (its last layer's LoRA then gets no gradient)."""
    out = tmp_path_factory.mktemp("ddp") / "runs"
    cfg = launcher.absolutize(demo_cfg(demo, out, launch={"device": "cpu", "num_processes": 2},
                                       network={"train_text_encoder": True, "dropout": 0.2},
                                       training={"max_train_epochs": 2, "clip_skip": 2},
                                       sampling={"prompts": ["a red circle", "a yellow star"], "every_n_epochs": None,
                                                 "steps": 2}))
    v, proc = start_probed(cfg)  # the real trainer + a dump per rank
    proc.wait(timeout=300)
    status = runs.finalize(v, proc.returncode)
    assert status["state"] == "finished", (v / "train.log").read_text()[-3000:]
    return v


def test_ddp_runs_two_processes_with_synchronized_weights(ddp_run):
    from safetensors.torch import load_file

    started = events(ddp_run, "run_started")
    assert len(started) == 1 and started[0]["world_size"] == 2
    r0, r1 = (load_file(ddp_run / "probe" / f"rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys() and len(r0) > 0
    assert {k.split(".", 1)[0] for k in r0} == {"unet", "text_encoder_0"}  # every trainable tensor is compared
    ups = [k for k in r0 if "lora_B" in k and ".layers.2." not in k]  # clip_skip 2: the last layer is unused
    assert ups and all(r0[k].abs().max() > 0 for k in ups)  # trained: lora_B starts at zero
    assert any(k.startswith("text_encoder_0.") for k in ups)
    different = [k for k in r0 if not r0[k].equal(r1[k])]
    assert different == [], different[:5]
    final = load_file(ddp_run / "checkpoints" / "final" / "lora.safetensors")
    assert all(final[k].equal(r0[k]) for k in r0)  # the checkpoint holds what every rank holds


def test_ddp_splits_every_global_batch_between_the_ranks(ddp_run):
    s0, s1 = (json.loads((ddp_run / "probe" / f"rank{r}-shard.json").read_text()) for r in (0, 1))
    assert s0["full"] == s1["full"] and (s0["rank"], s1["rank"], s0["world"]) == (0, 1, 2)
    assert len(s0["mine"]) == len(s1["mine"]) == len(s0["full"])
    for step, a, b in zip(s0["full"], s0["mine"], s1["mine"], strict=True):
        together = sorted(smp for micro in a + b for smp in micro)
        assert together == sorted(step)  # every sample of the global batch to exactly one rank


def test_ddp_step_loss_is_the_mean_over_the_ranks(ddp_run):
    """design.md: a step event's loss is over the whole global batch, not rank 0's half of it."""
    own = [json.loads((ddp_run / "probe" / f"rank{r}-shard.json").read_text())["losses"] for r in (0, 1)]
    logged = {e["step"]: e["loss"] for e in events(ddp_run, "step")}
    assert sorted(int(k) for k in own[0]) == sorted(logged)
    for step, loss in logged.items():
        a, b = own[0][str(step)], own[1][str(step)]
        assert abs(loss - (a + b) / 2) <= 1e-6 * max(1.0, abs(loss)), (step, loss, a, b)
    assert any(own[0][k] != own[1][k] for k in own[0])  # the ranks saw different data


def test_ddp_writes_each_event_and_file_once(ddp_run):
    total = runs.read_status(ddp_run)["total_steps"]
    assert [e["step"] for e in events(ddp_run, "step")] == list(range(1, total + 1))
    assert [e["epoch"] for e in events(ddp_run, "epoch_end")] == [1, 2]
    names = [e["name"] for e in events(ddp_run, "checkpoint_saved")]
    assert len(names) == len(set(names)) and {"epoch-000001", "final"} <= set(names)
    assert set(names) == {p.name for p in (ddp_run / "checkpoints").iterdir()}
    files = [Path(e["path"]).name for e in events(ddp_run, "export_saved")]
    assert len(files) == len(set(files)) and {"demo-000001.safetensors", "demo.safetensors"} <= set(files)
    assert set(files) == {p.name for p in (ddp_run / "exports").iterdir()}
    assert len(events(ddp_run, "run_finished")) == 1
    pngs = sorted(p.relative_to(ddp_run / "samples").as_posix() for p in (ddp_run / "samples").rglob("*.png"))
    assert pngs == ["final/0.png", "final/1.png"]
    assert not list(ddp_run.rglob("*.tmp"))


def test_ddp_spreads_samples_and_caching_over_the_ranks(ddp_run):
    """Each rank draws its share of the prompts (rank 0 writes them all) and encodes its share of
    the latents; the images do not depend on which rank drew them (prompt i has seed + i)."""
    saved = events(ddp_run, "sample_saved")
    assert [(e["prompt"], e["rank"]) for e in saved] == [("a red circle", 0), ("a yellow star", 1)]
    assert json.loads((ddp_run / "samples" / "final" / "prompts.json").read_text()) == ["a red circle", "a yellow star"]
    latents = [e for e in events(ddp_run, "cache_filled") if e["kind"] == "latents"]
    assert len(latents) == 1 and latents[0]["encoded_per_rank"] == [7, 7] and latents[0]["count"] == 14


@pytest.mark.skipif(not (ROOT / "backend" / "trainer" / "state.py").exists(), reason="needs state checkpoints")
def test_ddp_resumes_exactly_from_its_checkpoint(ddp_run):
    from safetensors.torch import load_file

    proc = run_cli("resume", str(ddp_run / "checkpoints" / "epoch-000001"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = runs.version_dirs(ddp_run.parent)[-1]
    assert resumed != ddp_run and events(resumed, "run_started")[0]["world_size"] == 2
    before = {e["step"]: e["loss"] for e in events(ddp_run, "step")}
    after = {e["step"]: e["loss"] for e in events(resumed, "step")}
    first = min(after)
    assert first == events(ddp_run, "epoch_end")[0]["step"] + 1 and max(after) == max(before)
    assert after == {k: v for k, v in before.items() if k >= first}  # bit-identical losses
    a, b = load_file(ddp_run / "exports" / "demo.safetensors"), load_file(resumed / "exports" / "demo.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def _ddp_long(demo: Path, out: Path) -> launcher.Launched:
    cfg = demo_cfg(demo, out, launch={"device": "cpu", "num_processes": 2}, training={"max_train_epochs": 500})
    return launcher.launch(cfg, cpu_threads=1)


def test_ddp_graceful_stop_stops_every_rank_at_the_same_step(demo, tmp_path):
    launched = _ddp_long(demo, tmp_path / "runs")
    v = launched.version_dir
    try:
        wait_steps(v, 2)
        status = launcher.stop(v, grace_s=90)
    finally:
        if process_tree.find_for_status(runs.read_status(v)):
            launcher.kill(v)
        launched.proc.wait(timeout=30)
    assert status["state"] == "stopped" and status["exit_code"] == 0, status
    step = status["step"]
    assert (v / "exports" / f"demo-stop{step:08d}.safetensors").is_file()
    assert (v / "checkpoints" / f"stop-{step:08d}" / "manifest.json").is_file()
    assert len(events(v, "run_finished")) == 1 and events(v)[-1]["state"] == "stopped"


def test_ddp_kill_leaves_no_worker_behind(demo, tmp_path):
    """accelerate's elastic agent starts each worker in a session of its own: a group kill would miss them."""
    launched = _ddp_long(demo, tmp_path / "runs")
    v = launched.version_dir
    try:
        wait_steps(v, 1)
        procs = process_tree.find_for_status(runs.read_status(v))
        workers = [p for p in procs if "--run-dir" in p.cmdline() and "accelerate.commands.launch" not in p.cmdline()]
        assert len(workers) == 2 and all(os.getsid(p.pid) != os.getsid(launched.proc.pid) for p in workers)
        status = launcher.kill(v)
    finally:
        launched.proc.wait(timeout=30)
    assert [p.pid for p in procs if alive(p.pid)] == []
    assert status["state"] == "stopped" and status["exit_code"] == -9 and "killed by request" in status["error"]


def test_ranks_that_diverge_fail_the_run_at_the_next_save_point(demo, tmp_path):
    """Rank 1 silently changes one tensor after step 5 (a probe disturbance): the save point at step 8
    compares every rank's tensors, names the one that differs, and writes nothing; step 4's stays."""
    cfg = demo_cfg(demo, tmp_path / "runs", launch={"device": "cpu", "num_processes": 2},
                   training={"max_train_epochs": 2}, sampling={"prompts": []},
                   saving={"save_every_n_steps": 4, "save_every_n_epochs": None, "save_last_n_epochs": None})
    env = {**launcher.launch_env(cfg), "LATHE_TEST_CORRUPT_RANK": "1@5"}
    launched = launcher.launch(cfg, env=env, cpu_threads=1, entry=PROBE_ENTRY)
    launched.proc.wait(timeout=300)
    v = launched.version_dir
    status = runs.finalize(v, launched.proc.returncode)
    assert status["state"] == "failed", status
    assert status["error"].startswith("ranks diverged: unet.") and "between rank 0 and rank 1" in status["error"]
    assert events(v)[-1]["error"] == status["error"] and events(v)[-1]["step"] == 8
    assert sorted(p.name for p in (v / "checkpoints").iterdir()) == ["step-00000004"]
    assert run_cli("verify", str(v / "checkpoints" / "step-00000004")).returncode == 0
    assert sorted(p.name for p in (v / "exports").iterdir()) == ["demo-step00000004.safetensors"]
