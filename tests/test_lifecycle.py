"""The run lifecycle with real processes: start, follow, stop, kill, reconcile, reattach, the lock."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend import checkpoints as C
from backend import launcher, lock, process_tree, runs
from backend.follow import Follower, follow_to_end
from tests.conftest import ENV, ROOT, events, run_cli, wait_for, write_config
from tests.lifecycle_helpers import alive, demo_cfg, fake_pids, start_fake, wait_steps
from tests.trainer_probe import PROBE_ENTRY

pytestmark = pytest.mark.train

LONG = {"max_train_epochs": 500}


def finish(proc: subprocess.Popen, v: Path) -> None:
    """Test cleanup: whatever happened, leave no process of the run behind."""
    if process_tree.find_for_status(runs.read_status(v)):
        launcher.kill(v)
    proc.wait(timeout=30)


def test_run_survives_its_launcher_and_a_new_process_follows_it_to_the_end(demo, tmp_path):
    """A GUI-less restart: the process that started the run exits at once; a new Python process
    finds the run from its folder alone and follows it to completion."""
    cfg = write_config(tmp_path / "cfg.json", demo_cfg(demo, tmp_path / "runs",
                                                       training={"max_train_steps": 12, "max_train_epochs": None})
                       .model_dump(mode="json"))
    starter = ("import sys; from backend import launcher; from backend.config import load_config_file\n"
               "print(launcher.launch(load_config_file(sys.argv[1]), cpu_threads=1).version_dir)")
    out = subprocess.run([sys.executable, "-c", starter, str(cfg)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    v = Path(out.stdout.strip())
    status = runs.read_status(v)
    assert status["state"] in ("starting", "running") and status["pid"] == status["pgid"]
    assert process_tree.find_for_status(status), "the run died with the process that started it"

    follower = ("import json, sys; from pathlib import Path; from backend.follow import follow_to_end\n"
                "st = follow_to_end(Path(sys.argv[1]))\nprint('FINAL ' + json.dumps(st))")
    out = subprocess.run([sys.executable, "-c", follower, str(v)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr
    final = json.loads(out.stdout.splitlines()[-1].removeprefix("FINAL "))
    assert final["state"] == "finished" and final["exit_code"] == 0 and final["step"] == 12
    assert "training demo: 12 steps" in out.stdout  # the follower copied the trainer's log
    assert not process_tree.find_for_status(final)

    # Following works from any byte offset: from the middle, exactly the rest comes back.
    whole = Follower(v).poll()
    assert whole.done and whole.events[-1]["event"] == "run_finished"
    mid = whole.events_offset // 2
    raw = (v / "events.jsonl").read_bytes()
    mid = raw.index(b"\n", mid) + 1
    rest = Follower(v, events_offset=mid, log_offset=whole.log_offset).poll()
    assert rest.events == [json.loads(x) for x in raw[mid:].splitlines()] and rest.log == ""


def test_graceful_stop_saves_a_stop_checkpoint(demo, tmp_path):
    env = {**launcher.launch_env(demo_cfg(demo, tmp_path)), "LATHE_RESOURCES_INTERVAL_S": "0.5"}
    launched = launcher.launch(demo_cfg(demo, tmp_path / "runs", training=LONG), env=env, cpu_threads=1)
    v = launched.version_dir
    try:
        wait_steps(v, 3)
        t0 = time.monotonic()
        status = launcher.stop(v, grace_s=90)
        assert time.monotonic() - t0 < 60
    finally:
        finish(launched.proc, v)
    assert status["state"] == "stopped" and status["exit_code"] == 0 and "STOP" in status["error"]
    step = status["step"]
    assert 3 <= step < 500
    assert (v / "exports" / f"demo-stop{step:08d}.safetensors").is_file()
    if (ROOT / "backend" / "trainer" / "state.py").exists():
        assert (v / "checkpoints" / f"stop-{step:08d}" / "manifest.json").is_file()
    finished = events(v, "run_finished")
    assert len(finished) == 1 and finished[0]["state"] == "stopped" and events(v)[-1] == finished[0]
    res = events(v, "resources")
    assert res and {"gpus", "ram", "disk", "data_wait_share", "process"} <= res[0].keys()
    assert res[0]["disk"]["free_mb"] > 0 and res[0]["process"]["rss_mb"] > 0


def test_a_trainer_error_ends_with_a_one_line_reason_and_the_traceback_in_the_log(demo, tmp_path):
    empty = tmp_path / "no-images"
    (empty / "5_thing").mkdir(parents=True)
    launched = launcher.launch(demo_cfg(demo, tmp_path / "runs", dataset={"train_data_dir": str(empty)}), cpu_threads=1)
    v = launched.version_dir
    st = follow_to_end(v, proc=launched.proc, out=io.StringIO())
    assert st["state"] == "failed" and st["exit_code"] == 1 and "\n" not in st["error"]
    assert st["error"].startswith("dataset.train_data_dir: no usable images in")
    assert events(v)[-1] == {**events(v)[-1], "event": "run_finished", "state": "failed", "error": st["error"]}
    assert "Traceback (most recent call last)" in (v / "train.log").read_text()


def test_a_stop_that_outlasts_its_grace_is_aborted_by_sigterm_and_still_recorded(demo, tmp_path):
    """The stop checkpoint hangs (tests/trainer_probe.py slows the save): SIGTERM after the grace period aborts
    it, and the trainer still writes its own final state, so no SIGKILL is needed. Each state file's write
    hangs 60 s, a disk that stalls: the trainer records its end and exits without waiting for the writes
    still under way, long before the launcher's SIGKILL would come (30 s after the SIGTERM)."""
    env = {**launcher.launch_env(demo_cfg(demo, tmp_path)), "LATHE_TEST_SLOW_SAVE_S": "60"}
    launched = launcher.launch(demo_cfg(demo, tmp_path / "runs", training=LONG), env=env, cpu_threads=1,
                               entry=PROBE_ENTRY)
    v = launched.version_dir
    try:
        wait_steps(v, 2)
        launcher.request_stop(v)
        wait_for(lambda: list(v.glob("checkpoints/stop-*.tmp/lora.safetensors")), timeout=120)  # inside the slow save
        t0 = time.monotonic()
        status = launcher.stop(v, grace_s=1, term_s=30)
        stopped_in = time.monotonic() - t0
    finally:
        finish(launched.proc, v)
    assert stopped_in < 30, stopped_in  # gone after the SIGTERM, before the SIGKILL
    assert status["state"] == "stopped" and status["stop_escalation"] == "SIGTERM"
    assert "aborted" in status["error"] and status["exit_code"] == 0
    assert not (v / "checkpoints" / f"stop-{status['step']:08d}").exists()
    assert events(v)[-1]["event"] == "run_finished" and "by" not in events(v)[-1]  # written by the trainer


def test_a_trainer_that_ignores_stop_is_killed_with_its_whole_tree(tmp_path):
    v, proc = start_fake(tmp_path, tmp_path / "runs", "ignore")
    try:
        wait_for(lambda: len(fake_pids(v)) == 3, timeout=30)
        pids = fake_pids(v)
        assert os.getsid(pids["child"]) != os.getsid(pids["leader"])  # a session of its own, out of the group's reach
        t0 = time.monotonic()
        status = launcher.stop(v, grace_s=1.0, term_s=1.0)
        assert time.monotonic() - t0 < 15
    finally:
        finish(proc, v)
    assert [role for role, pid in pids.items() if alive(pid)] == []
    assert status["state"] == "stopped" and status["exit_code"] == -signal.SIGKILL
    assert "did not stop within 2 s" in status["error"] and status["stop_escalation"] == "SIGTERM"
    last = events(v)[-1]
    assert last["event"] == "run_finished" and last["state"] == "stopped" and last["error"] == status["error"]


def test_sigkill_from_outside_is_reconciled_as_failed_with_the_log_tail(demo, tmp_path):
    out = tmp_path / "runs"
    launched = launcher.launch(demo_cfg(demo, out, training=LONG), cpu_threads=1)
    v = launched.version_dir
    try:
        wait_steps(v, 2)
        trainer = runs.read_status(v)["trainer_pid"]
        os.kill(trainer, signal.SIGKILL)
        launched.proc.wait(timeout=30)  # the run's small parent (backend.supervise) records the death and exits
        wait_for(lambda: not process_tree.find_for_status(runs.read_status(v)), timeout=30)
        status = runs.read_status(v)
        assert status["state"] == "failed" and status["exit_code"] == -9 and launched.proc.returncode == 137
        assert "SIGKILL" in status["error"] and "out-of-memory killer" in status["error"]
        assert status["step"] == events(v, "step")[-1]["step"]  # the last step reported, not the last heartbeat's
    finally:
        finish(launched.proc, v)
    proc = run_cli("runs", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    (info,) = json.loads(proc.stdout)
    assert info["path"] == str(v) and info["state"] == "failed" and info["run_name"] == "demo" and info["version"] == 0
    assert "without a final status" in info["reason"] and "SIGKILL" in info["reason"]
    assert runs.read_status(v)["state"] == "failed"
    assert events(v)[-1]["event"] == "run_finished" and events(v)[-1]["state"] == "failed"


def test_a_second_start_is_refused_until_the_first_run_ends(demo, tmp_path):
    out = tmp_path / "runs"
    v1, proc1 = start_fake(tmp_path, out, "honour")
    try:
        with pytest.raises(lock.RunBusyError) as err:
            launcher.launch(demo_cfg(demo, out))
        assert str(v1) in str(err.value) and "stop" in str(err.value)
        assert not (out / "demo").exists()  # refused before anything was created
        cli = run_cli("train", str(write_config(tmp_path / "c.json", demo_cfg(demo, out).model_dump(mode="json"))))
        assert cli.returncode == 2 and "another run is active" in cli.stderr
        with lock.claim(out, "gpu-0"):  # other devices: no conflict
            pass
        os.killpg(runs.read_status(v1)["pgid"], signal.SIGKILL)  # the holder dies without a word
        proc1.wait(timeout=10)
        assert lock.holder(out, "cpu") is None  # the lock did not go stale
        v2, proc2 = start_fake(tmp_path, out, "honour")
        finish(proc2, v2)
    finally:
        finish(proc1, v1)


def test_ctrl_c_on_train_stops_gracefully(demo, tmp_path):
    cfg = write_config(tmp_path / "cfg.json", demo_cfg(demo, tmp_path / "runs", training=LONG).model_dump(mode="json"))
    cli = subprocess.Popen([sys.executable, "-m", "backend", "train", str(cfg)], cwd=ROOT, env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    v = Path(cli.stdout.readline().strip())
    try:
        wait_steps(v, 2)
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=90)
    finally:
        cli.kill()
        finish(cli, v)
    assert cli.returncode == 3, err
    assert "stopping gracefully" in err and f"run stopped: {v}" in out
    status = runs.read_status(v)
    assert status["state"] == "stopped" and (v / "exports" / f"demo-stop{status['step']:08d}.safetensors").is_file()
    stop = v / "checkpoints" / f"stop-{status['step']:08d}"
    assert C.checkpoint_status(stop)[0] == "valid" and C.read_manifest(stop)["step"] == status["step"]


def test_a_second_ctrl_c_kills_the_tree(demo, tmp_path):
    cfg = write_config(tmp_path / "cfg.json", demo_cfg(demo, tmp_path / "runs", training=LONG).model_dump(mode="json"))
    cli = subprocess.Popen([sys.executable, "-m", "backend", "train", str(cfg)], cwd=ROOT, env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    v = Path(cli.stdout.readline().strip())
    try:
        wait_for(lambda: runs.read_status(v).get("pid"), timeout=30)
        cli.send_signal(signal.SIGINT)
        time.sleep(0.5)
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=60)
    finally:
        cli.kill()
        finish(cli, v)
    status = runs.read_status(v)
    assert cli.returncode == 3, err
    assert status["state"] == "stopped" and "second Ctrl+C" in status["error"] and status["exit_code"] == -9
    assert not process_tree.find_for_status(status)


def test_stop_cli_graceful_and_kill(tmp_path):
    v, proc = start_fake(tmp_path, tmp_path / "runs", "honour")
    cli = run_cli("stop", str(v))
    proc.wait(timeout=10)
    assert cli.returncode == 0 and f"run stopped: {v}" in cli.stdout, cli.stdout + cli.stderr
    assert runs.read_status(v)["exit_code"] == 0
    assert "already stopped" in run_cli("stop", str(v)).stdout

    v, proc = start_fake(tmp_path, tmp_path / "runs", "ignore", exclusive=False)
    wait_for(lambda: len(fake_pids(v)) == 3, timeout=30)
    cli = run_cli("stop", str(v), "--kill")
    proc.wait(timeout=10)
    assert cli.returncode == 0 and "run stopped" in cli.stdout and "killed by request" in cli.stdout
    assert not any(alive(p) for p in fake_pids(v).values())
    assert run_cli("stop", str(tmp_path)).returncode == 2


def test_a_crash_without_final_status_fails_with_the_reason(tmp_path):
    v, proc = start_fake(tmp_path, tmp_path / "runs", "crash")
    log = io.StringIO()
    st = follow_to_end(v, proc=proc, out=log)
    assert st["state"] == "failed" and st["exit_code"] == 3 and "fake trainer running" in log.getvalue()
    assert "boom: the fake trainer broke" in st["error"] and "exit code 3" in st["error"]
    assert events(v)[-1] == {**events(v)[-1], "event": "run_finished", "state": "failed", "error": st["error"]}


def test_a_stale_heartbeat_marks_a_hung_run_failed(tmp_path):
    v, proc = start_fake(tmp_path, tmp_path / "runs", "hang")
    try:
        assert runs.reconcile(v)["state"] == "running"
        status = runs.reconcile(v, now=time.time() + runs.STALE_HEARTBEAT_S + 5)
        assert status["state"] == "failed" and "no heartbeat" in status["error"] and "fake trainer running" in status["error"]
    finally:
        finish(proc, v)


def test_lifecycle_modules_do_not_import_torch():
    code = ("import sys\nimport backend.launcher, backend.runs, backend.follow, backend.lock, backend.resources, "
            "backend.process_tree, backend.__main__\n"
            "print([m for m in ('torch', 'diffusers', 'transformers', 'gradio') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_dead_runs_status_ends_at_its_last_reported_step_not_its_last_heartbeat(tmp_path):
    """The heartbeat writes the step to status.json every few seconds; the step events are newer.
    A trainer killed between the two: its status and `runs` say the last step it reported (issue 17's
    "23 vs 31")."""
    from backend.events import EventWriter, read_events

    v = runs.create_version_dir(tmp_path / "runs", "demo")
    runs.new_status(v, total_steps=64)
    runs.update_status(v, state="running", step=23, heartbeat_at=time.time())
    writer = EventWriter(v / "events.jsonl")
    for step in range(1, 32):
        writer.emit("step", step=step, loss=0.1)
    writer.close()
    with open(v / "events.jsonl", "a") as fh:
        fh.write('{"event": "step", "step": 32, "lo')  # a line cut short by the kill
    status = runs.finalize(v, -9)
    assert status["state"] == "failed" and status["step"] == 31
    (info,) = runs.list_runs(tmp_path / "runs")
    assert info.step == 31 and info.state == "failed"
    evs, _ = read_events(v / "events.jsonl")  # (skips the cut line; the run_finished after it is whole)
    assert evs[-1]["event"] == "run_finished" and evs[-1]["step"] == 31 and evs[-2]["step"] == 31
