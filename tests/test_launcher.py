"""argv building for every launch mode, hostile values, the lock, and resource sampling (no trainer)."""

from __future__ import annotations

import json
import shlex
import sys
import types
from pathlib import Path

import pytest
from pydantic import ValidationError

from backend import launcher, lock, resources, runs
from backend.config import ConfigError, TrainingConfig
from backend.presets import resolve
from tests.conftest import wait_for

V = Path("/runs/demo/version_0")
TRAINER = ["-m", "backend.trainer", "--run-dir", str(V)]


def cfg(**launch: object) -> TrainingConfig:
    mp = launch.pop("mixed_precision", "no")
    return TrainingConfig.model_validate({"launch": launch, "training": {"mixed_precision": mp}})


def argv(c: TrainingConfig, **kw: object) -> list[str]:
    out = launcher.build_argv(c, V, python="PY", **kw)
    assert out[:3] == ["PY", "-m", "accelerate.commands.launch"] and out[-4:] == TRAINER
    return out[3:-4]


def test_cpu_single_process_starts_the_trainer_directly():
    """One process needs no `accelerate launch`: the trainer starts as it is, with the environment
    accelerate would have given it."""
    c = cfg(device="cpu")
    assert launcher.build_argv(c, V, python="PY", cpu_threads=2) == ["PY", "-m", "backend.supervise", str(V), "--",
                                                                     "PY", *TRAINER, "--cpu-threads", "2"]
    env = launcher.launch_env(c, base={"PATH": "/bin"})
    assert env["ACCELERATE_USE_CPU"] == "true" and env["CUDA_VISIBLE_DEVICES"] == "" and env["PYTHONUNBUFFERED"] == "1"
    assert env["ACCELERATE_MIXED_PRECISION"] == "no" and env["ACCELERATE_DYNAMO_BACKEND"] == "NO"


def test_cpu_threads_follow_the_step_size_unless_set(demo, monkeypatch):
    """The demo's tiny step trains on one thread (several only add per-operator overhead); a step
    with real work shares the machine's cores among its processes; a set value always wins."""
    monkeypatch.setattr(launcher.os, "cpu_count", lambda: 8)

    def threads(**kw: object) -> int:
        launch = kw.pop("launch", {"device": "cpu"})
        return launcher.default_cpu_threads(TrainingConfig.model_validate({
            "model": {"pretrained_model": str(kw.pop("model", demo / "model"))}, "launch": launch,
            "dataset": {"resolution": kw.pop("resolution", 64)}, "training": {"train_batch_size": kw.pop("batch", 4)}}))

    assert launcher.denoiser_bytes(str(demo / "model")) == sum(f.stat().st_size for f in (demo / "model/unet").glob("*.safetensors"))
    assert threads() == 1 and threads(model=demo / "model.safetensors") == 1 and threads(model=demo / "model-flux") == 1
    assert threads(resolution=256) == 8 and threads(batch=16) == 8  # 16x and 4x the demo's work
    assert threads(launch={"device": "cpu", "num_processes": 2}, resolution=512) == 4
    assert threads(model="/nonexistent/model") == 8  # size unknown: the cores
    assert threads(launch={"device": "cpu", "num_cpu_threads_per_process": 3}) == 3
    assert threads(launch={"device": "cpu", "num_cpu_threads_per_process": 3}, resolution=512) == 3
    with pytest.raises(ValidationError, match="num_cpu_threads_per_process"):
        TrainingConfig.model_validate({"launch": {"num_cpu_threads_per_process": 0}})


def test_cpu_ddp_uses_multi_gpu_with_accelerate_use_cpu():
    c = cfg(device="cpu", num_processes=2)
    assert argv(c) == ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                       "--dynamo_backend", "no"]
    assert launcher.launch_env(c, base={})["ACCELERATE_USE_CPU"] == "true"
    assert launcher.default_cpu_threads(c) >= 1


def test_one_gpu_with_mixed_precision():
    c = cfg(device="cuda", gpu_ids="1", mixed_precision="bf16")
    assert launcher.build_argv(c, V, python="PY", cpu_threads=4)[-6:] == ["--", "PY", *TRAINER]  # threads: CPU only
    env = launcher.launch_env(c, base={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert "ACCELERATE_USE_CPU" not in env and env["CUDA_VISIBLE_DEVICES"] == "1"  # as accelerate's --gpu_ids
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert launcher.launch_env(cfg(device="cuda", gpu_ids="all"), base={"CUDA_VISIBLE_DEVICES": "0,1"})["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_several_gpus():
    c = cfg(device="cuda", num_processes=4, gpu_ids="0, 1,2,3", mixed_precision="fp16", main_process_port=29501)
    assert argv(c) == ["--multi_gpu", "--num_processes", "4", "--num_machines", "1", "--main_process_port", "29501",
                       "--gpu_ids", "0,1,2,3", "--mixed_precision", "fp16", "--dynamo_backend", "no"]


@pytest.mark.parametrize("rank", [0, 1])
def test_several_machines(rank):
    c = cfg(device="cuda", num_processes=16, num_machines=2, machine_rank=rank, main_process_ip="10.0.0.5",
            main_process_port=29500, mixed_precision="bf16")
    assert argv(c) == ["--multi_gpu", "--num_processes", "16", "--num_machines", "2", "--machine_rank", str(rank),
                       "--main_process_ip", "10.0.0.5", "--main_process_port", "29500", "--mixed_precision", "bf16",
                       "--dynamo_backend", "no"]


@pytest.mark.parametrize("name", ["deepspeed zero2.yaml", "fsdp.yaml"])
def test_an_accelerate_config_file_replaces_the_launch_flags(name):
    # Flags would override the file; --multi_gpu would even turn DeepSpeed off.
    c = cfg(device="cuda", num_processes=8, accelerate_config_file=f"/cfg/{name}", mixed_precision="bf16")
    assert argv(c) == ["--config_file", f"/cfg/{name}"]


HOSTILE = "/tmp/a b/it's \"q\"; touch PWNED $(touch PWNED) `touch PWNED` | & > x\n*.yaml"


def test_hostile_values_arrive_as_single_literal_arguments(tmp_path):
    """Run the built argv for real (with a probe in place of accelerate) and compare what arrives."""
    v = tmp_path / "out $(touch PWNED); x" / "version_0"
    v.mkdir(parents=True)
    c = cfg(device="cuda", accelerate_config_file=HOSTILE)
    built = launcher.build_argv(c, v)
    assert built[built.index("--config_file") + 1] == HOSTILE and built[-1] == str(v)
    probe = [sys.executable, "-c", "import json, sys; print('ARGV' + json.dumps(sys.argv[1:]))", *built[3:]]
    runs.new_status(v)
    proc = launcher.start(v, probe, launcher.launch_env(c), exclusive=False)
    assert proc.wait(timeout=30) == 0
    log = (v / "train.log").read_text()
    assert json.loads(log.split("ARGV", 1)[1]) == built[3:]
    assert not list(tmp_path.rglob("PWNED")) and not (launcher.PROJECT_ROOT / "PWNED").exists()


def test_command_txt_records_the_exact_command(tmp_path):
    c = TrainingConfig.model_validate({"run_name": "demo", "output_dir": str(tmp_path),
                                       "launch": {"device": "cpu", "num_processes": 2}})
    v = runs.create_version_dir(tmp_path, "demo")
    built = launcher.build_argv(c, v)
    runs.write_run_files(v, c, launcher.command_argv(c, built))
    words = shlex.split((v / "command.txt").read_text())
    assert words[0] == "env" and "ACCELERATE_USE_CPU=true" in words and words[-len(built):] == built


@pytest.mark.parametrize("launch", [{"main_process_ip": "1.2.3.4; rm -rf /", "num_machines": 2},
                                    {"main_process_ip": "$(reboot)", "num_machines": 2},
                                    {"gpu_ids": "0;1"}, {"gpu_ids": "0,1 && x"}])
def test_hostile_host_and_gpu_values_are_rejected_by_validation(launch):
    with pytest.raises(ConfigError):
        resolve({"launch": {"device": "cuda", **launch}})


# ------------------------------------------------------------------------------------------ lock
def test_gpu_set_keys():
    assert lock.gpu_set(cfg(device="cpu").launch) == "cpu"
    assert lock.gpu_set(cfg(device="cuda").launch) == "gpu-all"
    assert lock.gpu_set(cfg(device="auto", gpu_ids="0,1").launch) == "gpu-0,1"


def test_a_lock_naming_a_dead_run_is_free(tmp_path):
    v = runs.create_version_dir(tmp_path, "x")
    runs.update_status(v, state="running", pid=2 ** 22 + 1, pgid=2 ** 22 + 1, run_token="gone", launched_at=0)
    with lock.claim(tmp_path, "cpu") as held:
        held.hold(v)
    assert json.loads(lock.lock_path(tmp_path, "cpu").read_text())["version_dir"] == str(v)
    assert lock.holder(tmp_path, "cpu") is None
    with lock.claim(tmp_path, "cpu"):  # not refused: nobody alive holds it
        pass


# ------------------------------------------------------------------------------------- resources
def test_resources_sample_without_gpus(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    monkeypatch.setattr(resources.shutil, "which", lambda name: None)
    snap = resources.sample(tmp_path / "not-yet-created")
    assert snap["gpus"] == [] and snap["ram"]["total_mb"] > 0 and 0 <= snap["ram"]["pct"] <= 100
    assert snap["disk"]["path"] == str(tmp_path) and snap["disk"]["free_mb"] > 0


def test_resources_read_nvml_per_device(monkeypatch):
    mib = 1024 * 1024
    nv = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=(h + 1) * 1000 * mib, total=24000 * mib),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=50 + h),
        nvmlDeviceGetName=lambda h: b"NVIDIA RTX 4090",
    )
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    assert resources.gpus() == [
        {"index": 0, "name": "NVIDIA RTX 4090", "util_pct": 50.0, "mem_used_mb": 1000.0, "mem_total_mb": 24000.0},
        {"index": 1, "name": "NVIDIA RTX 4090", "util_pct": 51.0, "mem_used_mb": 2000.0, "mem_total_mb": 24000.0},
    ]


def test_parse_nvidia_smi():
    text = "0, NVIDIA A100-SXM4-80GB, 97, 70123, 81920\n1, NVIDIA A100-SXM4-80GB, 3, 1, 81920\ngarbage\n"
    gpus = resources.parse_nvidia_smi(text)
    assert [g["util_pct"] for g in gpus] == [97.0, 3.0] and gpus[0]["mem_used_mb"] == 70123.0


def test_warnings_for_data_bottleneck_and_full_disk():
    assert resources.data_wait_share(1.0, 2.0) is None  # too short a window to judge
    assert resources.data_wait_share(4.0, 6.0) == 0.4
    snap = {"disk": {"path": "/runs", "free_mb": 100.0, "total_mb": 1000.0}}
    w = resources.warnings_for(snap, 0.4, 200 * 1024 * 1024)
    assert len(w) == 2 and w[0].startswith("data loading is the bottleneck") and "num_workers" in w[0]
    assert w[1].startswith("free disk space (100 MB") and "next save" in w[1]
    assert resources.warnings_for(snap, 0.1, 10 * 1024 * 1024) == []


def test_run_io_reports_resources_and_warns_once(tmp_path, monkeypatch):
    from backend.trainer.run_io import RunIO

    io = RunIO(tmp_path, is_main=True, tensorboard=False)
    monkeypatch.setattr(resources, "disk", lambda p: {"path": str(p), "free_mb": 50.0, "total_mb": 100.0})
    io.emit("export_saved", path="x", step=10, epoch=1, bytes=40 * 1024 * 1024)
    io.emit("checkpoint_saved", kind="step", name="step-00000010", path="y", step=10, epoch=1, bytes=30 * 1024 * 1024)
    assert io.next_save_bytes() == 70 * 1024 * 1024
    io.data_wait_s, io.busy_s = 6.0, 4.0
    first = io.report_resources()
    assert first["data_wait_share"] == 0.6 and first["data_wait_s"] == 6.0
    io.data_wait_s, io.busy_s = 6.5, 13.5
    assert io.report_resources()["data_wait_share"] == 0.05  # 0.5 s of 10 s: over the new window only
    io.close()
    evs = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    warnings = [e["message"] for e in evs if e["event"] == "warning"]
    assert len(warnings) == 2 and warnings[0].startswith("data loading") and warnings[1].startswith("free disk space")
    assert [e["event"] for e in evs].count("resources") == 2


def test_heartbeat_thread_emits_resources(tmp_path, monkeypatch):
    from backend.trainer import run_io

    monkeypatch.setattr(run_io, "RESOURCES_S", 0.2)
    monkeypatch.setattr(run_io, "HEARTBEAT_S", 0.1)
    runs.new_status(tmp_path)
    io = run_io.RunIO(tmp_path, is_main=True, tensorboard=False)
    io.start_heartbeat()
    wait_for(lambda: '"resources"' in (tmp_path / "events.jsonl").read_text(), timeout=10)
    io.close()
    assert runs.read_status(tmp_path)["heartbeat_at"] > runs.read_status(tmp_path)["started_at"]


def test_preview_shows_the_command_a_launch_would_run():
    text = launcher.preview(cfg(device="cpu", num_processes=2))
    words = shlex.split(text)
    assert words[0] == "env" and "ACCELERATE_USE_CPU=true" in words and "--multi_gpu" in words
    assert words[-2:] == ["--run-dir", "<version_dir>"]


def test_a_launch_that_cannot_start_is_recorded_as_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "build_argv", lambda *a, **k: [str(tmp_path / "no-such-python")])
    c = TrainingConfig.model_validate({"run_name": "x", "output_dir": str(tmp_path), "launch": {"device": "cpu"}})
    with pytest.raises(FileNotFoundError):
        launcher.launch(c)
    (info,) = runs.list_runs(tmp_path)
    assert info.state == "failed" and info.reason.startswith("could not start the trainer")
    with lock.claim(tmp_path, "cpu"):  # and it holds no lock
        pass


# ------------------------------------------------------------------------------- several machines
def test_several_machines_on_cpu_use_gloo_ddp_not_cpu_flag():
    c = cfg(device="cpu", num_processes=2, num_machines=2, machine_rank=1, main_process_ip="127.0.0.1",
            main_process_port=29123)
    assert argv(c, cpu_threads=1) == ["--multi_gpu", "--num_processes", "2", "--num_machines", "2", "--machine_rank", "1",
                                      "--main_process_ip", "127.0.0.1", "--main_process_port", "29123",
                                      "--num_cpu_threads_per_process", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    assert launcher.env_overrides(c)["ACCELERATE_USE_CPU"] == "true"


def test_worker_commands_name_each_other_machine():
    c = cfg(device="cuda", num_processes=6, num_machines=3, main_process_ip="10.0.0.5", main_process_port=29600)
    assert launcher.other_machine_ranks(c) == [1, 2]
    assert launcher.worker_commands(c, "my run.json") == [
        "python -m backend train 'my run.json' --set launch.machine_rank=1",
        "python -m backend train 'my run.json' --set launch.machine_rank=2"]
    assert launcher.worker_commands(c)[0] == "python -m backend train lora.json --set launch.machine_rank=1"
    # shown from machine 1, the "other" machines are 0 and 2
    one = cfg(device="cuda", num_processes=6, num_machines=3, machine_rank=1, main_process_ip="10.0.0.5")
    assert [w.split("=")[-1] for w in launcher.worker_commands(one)] == ["0", "2"]
    assert launcher.worker_commands(cfg(device="cuda", num_processes=2)) == []  # one machine
    # an accelerate config file sets the machines itself
    f = cfg(num_machines=2, main_process_ip="10.0.0.5", accelerate_config_file="/etc/acc.yaml")
    assert launcher.worker_commands(f) == []


def test_worker_command_parses_and_sets_only_the_rank(tmp_path):
    from backend.__main__ import build_parser
    from backend.presets import load_config_or_preset

    c = cfg(device="cpu", num_processes=2, num_machines=2, main_process_ip="127.0.0.1", main_process_port=29123)
    path = tmp_path / "lora.json"
    path.write_text(json.dumps(c.model_dump(mode="json")))
    (cmd,) = launcher.worker_commands(c, str(path))
    words = shlex.split(cmd)
    assert words[:3] == ["python", "-m", "backend"]
    args = build_parser().parse_args(words[3:])
    got = load_config_or_preset(args.config, args.set)
    assert got.launch.machine_rank == 1
    assert got.model_dump() == {**c.model_dump(), "launch": {**c.launch.model_dump(), "machine_rank": 1}}


def test_gui_shows_the_commands_for_the_other_machines():
    from gui.preview import worker_commands_text

    c = resolve({"run_name": "demo", "launch": {"device": "cuda", "num_processes": 4, "num_machines": 2,
                                                "main_process_ip": "10.0.0.5", "main_process_port": 29600}})
    text = worker_commands_text(c)
    assert "# machine 1:\npython -m backend train demo.json --set launch.machine_rank=1" in text
    assert "10.0.0.5:29600" in text and "machine 0 only" in text
    assert worker_commands_text(resolve({"run_name": "demo"})) == ""


def test_default_cpu_threads_count_this_machines_processes(monkeypatch):
    monkeypatch.setattr(launcher.os, "cpu_count", lambda: 8)
    assert launcher.default_cpu_threads(cfg(device="cpu", num_processes=2)) == 4
    two = cfg(device="cpu", num_processes=2, num_machines=2, main_process_ip="127.0.0.1")
    assert launcher.default_cpu_threads(two) == 8  # one process on this machine


def test_worker_run_io_writes_status_and_only_its_events(tmp_path):
    from backend.trainer.run_io import RunIO

    runs.new_status(tmp_path)
    ident = {"role": "worker", "machine_rank": 1, "num_machines": 2, "host": "b", "main_host": "a",
             "main_version_dir": "/runs/demo/version_0"}
    io = RunIO(tmp_path, is_main=False, tensorboard=True, worker=True, identity=ident)
    io.status(state="running", **io.identity)
    io.emit("run_started", version=0, world_size=2)
    io.emit("step", step=1, loss=0.5)
    io.emit("checkpoint_saved", kind="final", name="final", path="x", step=1, epoch=1, bytes=1)
    io.emit("run_finished", state="finished", step=1, error=None)
    io.status(state="finished", step=1, exit_code=0)
    io.close()
    evs = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in evs] == ["run_started", "run_finished"]
    assert evs[0]["main_version_dir"] == "/runs/demo/version_0" and evs[0]["role"] == "worker"
    assert evs[1]["role"] == "worker" and evs[1]["machine_rank"] == 1 and "main_host" not in evs[1]
    assert not (tmp_path / "tensorboard").exists()
    (info,) = [runs.describe(tmp_path.parent / "version_0", runs.read_status(tmp_path))]
    assert info.role == "worker" and info.worker_of == "machine 1, worker of a:/runs/demo/version_0"
    # a process that is neither the main one nor a machine's local main one writes nothing
    other = tmp_path / "other"
    other.mkdir()
    silent = RunIO(other, is_main=False, tensorboard=False, worker=False, identity=ident)
    silent.status(state="running")
    silent.emit("run_started", version=0)
    silent.close()
    assert list(other.iterdir()) == []


def test_a_run_on_another_host_is_judged_by_its_heartbeat_alone(tmp_path, monkeypatch):
    """Shared storage: this machine cannot see another machine's processes, so no process is no verdict."""
    v = tmp_path / "demo" / "version_0"
    v.mkdir(parents=True)
    runs.new_status(v)
    now = runs.read_status(v)["started_at"]
    runs.update_status(v, state="running", pid=999999, pgid=999999, run_token="t", host="elsewhere", heartbeat_at=now)
    assert runs.reconcile(v, now=now + 5)["state"] == "running"
    st = runs.reconcile(v, now=now + runs.STALE_HEARTBEAT_S + 5)
    assert st["state"] == "failed" and "from host elsewhere" in st["error"]
    # the same status from this host: its processes are gone, so it failed
    w = tmp_path / "demo" / "version_1"
    w.mkdir()
    runs.new_status(w)
    runs.update_status(w, state="running", pid=999999, pgid=999999, run_token="t", heartbeat_at=now)
    assert runs.reconcile(w, now=now + 5)["state"] == "failed"
