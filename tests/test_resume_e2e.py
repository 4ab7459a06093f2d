"""Checkpoints that never lie, end to end on the demo model: exact resume (epoch boundary and
mid-epoch, AdamW and Prodigy, after a save point, a STOP and a SIGINT), rotation, disk-full
safety, corruption detection. SIGKILLs at random moments: test_fault_campaign.py."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from backend import checkpoints as C
from backend import launcher
from tests.conftest import events, run_cli, start_run, step_losses, train, wait_for

pytestmark = pytest.mark.train

STEPS = dict(training={"max_train_epochs": 3}, sampling={"prompts": []},
             saving={"save_every_n_epochs": 1, "save_last_n_epochs": None, "save_every_n_steps": 5})
# Prodigy's runs: two epochs are enough for a resume mid-epoch 2 (step 20) and a stop early in epoch 1.
PRODIGY_STEPS = {**STEPS, "training": {"max_train_epochs": 2}}
# The resume from epoch-000001 also keeps only the newest epoch save and no step saves: the same
# resumed run shows that it is bit-exact and that rotation never touches the checkpoint it came from.
ROTATING_RESUME = ("saving.save_last_n_epochs=1", "saving.save_every_n_steps=null")
PRODIGY = {"type": "Prodigy", "d_coef": 0.7, "weight_decay": 0.01}  # d grows within a few steps


def resume(checkpoint, *sets: str):
    proc = run_cli("resume", str(checkpoint), *sum((["--set", s] for s in sets), []))
    lines = proc.stdout.splitlines()
    version = next(ln for ln in lines if "/version_" in ln and not ln.startswith("resume"))
    from pathlib import Path
    return proc, Path(version)


def assert_continues(straight, resumed, from_step: int):
    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(b) == list(range(from_step + 1, max(a) + 1))
    assert all(a[k] == b[k] for k in b), [(k, a[k], b[k]) for k in b if a[k] != b[k]][:3]  # bit-identical
    fa, fb = load_file(straight / "exports" / "demo.safetensors"), load_file(resumed / "exports" / "demo.safetensors")
    assert fa.keys() == fb.keys() and all((fa[k] == fb[k]).all() for k in fa)


@pytest.fixture(scope="module")
def straight_adamw(demo, tmp_path_factory):
    proc, v = train(tmp_path_factory.mktemp("adamw"), demo, **STEPS)
    assert proc.returncode == 0, proc.stderr
    return v


@pytest.fixture(scope="module")
def straight_prodigy(demo, tmp_path_factory):
    proc, v = train(tmp_path_factory.mktemp("prodigy"), demo, optimizer=PRODIGY, **PRODIGY_STEPS)
    assert proc.returncode == 0, proc.stderr
    return v


@pytest.fixture(scope="module")
def adamw_resumed(straight_adamw):
    """Resumes of the straight AdamW run, one per checkpoint name, each run once for the module."""
    done: dict[str, tuple] = {}

    def get(name: str):
        if name not in done:
            done[name] = resume(straight_adamw / "checkpoints" / name, *(ROTATING_RESUME if name == "epoch-000001" else ()))
        return done[name]
    return get


@pytest.mark.parametrize("name, step", [("epoch-000001", 16), ("step-00000025", 25)])
def test_adamw_resume_is_bit_exact(straight_adamw, adamw_resumed, name, step):
    proc, v = adamw_resumed(name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    started = events(v, "run_started")[0]
    assert started["resumed_from"].endswith(name) and v.name != straight_adamw.name
    assert json.loads((v / "config.json").read_text())["resume_from"].endswith(name)
    assert_continues(straight_adamw, v, step)


def test_prodigy_resume_mid_epoch_keeps_its_estimate(straight_prodigy):
    proc, v = resume(straight_prodigy / "checkpoints" / "step-00000020")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_continues(straight_prodigy, v, 20)
    d_straight = {e["step"]: e["d"] for e in events(straight_prodigy, "step")}
    d_resumed = {e["step"]: e["d"] for e in events(v, "step")}
    assert d_resumed[21] == d_straight[21] and d_resumed[21] > PRODIGY.get("d0", 1e-6)  # not restarted


def test_stop_then_resume_is_bit_exact(straight_prodigy, demo, tmp_path):
    """A STOP file (the GUI's Stop). A SIGINT (Ctrl+C) ends in the same stop checkpoint, written by
    the same code: test_lifecycle.py checks that it is written and valid."""
    proc, v = start_run(tmp_path, demo, optimizer=PRODIGY, extra_env={"LATHE_TEST_SLOW_STEP_S": "0.05"}, **PRODIGY_STEPS)
    try:
        wait_for(lambda: len(events(v, "step")) >= 7 if (v / "events.jsonl").exists() else False, timeout=120)
        launcher.request_stop(v)
        proc.wait(timeout=60)
    finally:
        launcher.kill_group(proc.pid)
    last = events(v)[-1]
    assert last["event"] == "run_finished" and last["state"] == "stopped", last
    stop = v / "checkpoints" / f"stop-{last['step']:08d}"
    assert C.checkpoint_status(stop)[0] == "valid"
    assert (v / "exports" / f"demo-stop{last['step']:08d}.safetensors").is_file()
    proc2, v2 = resume(stop)
    assert proc2.returncode == 0, proc2.stdout + proc2.stderr
    assert_continues(straight_prodigy, v2, last["step"])


def test_rotation_keeps_exactly_the_newest(demo, tmp_path):
    proc, v = train(tmp_path, demo, training={"max_train_epochs": 5}, sampling={"prompts": []},
                    saving={"save_every_n_epochs": 1, "save_last_n_epochs": 2, "save_every_n_steps": 10, "save_last_n_steps": 3})
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (v / "checkpoints").iterdir()) == [
        "epoch-000004", "epoch-000005", "final", "step-00000060", "step-00000070", "step-00000080"]
    assert sorted(p.name for p in (v / "exports").iterdir()) == [
        "demo-000004.safetensors", "demo-000005.safetensors", "demo-step00000060.safetensors",
        "demo-step00000070.safetensors", "demo-step00000080.safetensors", "demo.safetensors"]
    removed = [e["name"] for e in events(v, "checkpoint_removed")]
    # 16 steps per epoch: in step order, 40 -> step-10, 48 -> epoch-1, 50, 60, 64 -> epoch-2, 70, 80 -> step-50, epoch-3
    assert removed == ["step-00000010", "epoch-000001", "step-00000020", "step-00000030", "epoch-000002",
                       "step-00000040", "step-00000050", "epoch-000003"]
    assert all("only the newest" in e["reason"] for e in events(v, "export_removed"))
    # Save first, then prune: every removal comes after the save that replaced it.
    evs = events(v)
    for i, e in enumerate(evs):
        if e["event"] == "checkpoint_removed":
            assert evs[i - 1]["event"] == "export_saved"


def test_foreign_files_and_resumed_from_checkpoint_are_never_rotated(straight_adamw, adamw_resumed):
    proc, v = adamw_resumed("epoch-000001")  # with ROTATING_RESUME's settings
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert C.checkpoint_status(straight_adamw / "checkpoints" / "epoch-000001")[0] == "valid"
    assert sorted(p.name for p in (v / "checkpoints").iterdir()) == ["epoch-000003", "final"]


def test_validation_best_and_verify(demo, tmp_path):
    proc, v = train(tmp_path, demo, dataset={"validation_split": 0.25}, training={"max_train_epochs": 2},
                    sampling={"prompts": []}, saving={"save_every_n_epochs": 1, "save_last_n_epochs": None})
    assert proc.returncode == 0, proc.stderr
    vals = events(v, "validation")
    assert len(vals) == 3  # two epoch saves + final
    best_val = min(e["val_loss"] for e in vals)
    manifest = C.read_manifest(v / "checkpoints" / "best")
    assert manifest["val_loss"] == best_val and (v / "exports" / "demo-best.safetensors").is_file()
    out = run_cli("verify", str(v / "checkpoints" / "best"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "difference 0.00e+00" in out.stdout and "VALID" in out.stdout
    listing = json.loads(run_cli("checkpoints", str(v.parent), "--json").stdout)
    assert {c["name"] for c in listing} == {"epoch-000001", "epoch-000002", "final", "best"}
    assert all(c["status"] == "valid" for c in listing)


def test_flipped_byte_is_reported_corrupt(straight_adamw, tmp_path):
    import shutil

    v = tmp_path / "copy" / "version_0"
    shutil.copytree(straight_adamw, v)
    f = v / "checkpoints" / "epoch-000002" / "lora.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    out = run_cli("verify", str(f.parent))
    assert out.returncode == 1 and "corrupt" in out.stdout and "lora.safetensors: xxh3_128 hash differs" in out.stdout
    listing = {c["name"]: c["status"] for c in json.loads(run_cli("checkpoints", str(v), "--json").stdout)}
    assert listing["epoch-000002"] == "corrupt" and listing["epoch-000001"] == "valid"
