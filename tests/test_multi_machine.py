"""A run across two machines, stood in for by two launches on this one (CPU gloo DDP on 127.0.0.1,
one process each, machine_rank 0 and 1, an output folder each), against the same config on one
machine with two processes: every machine's version folder ends truthfully, the worker's names the
main machine, only machine 0 writes checkpoints, and the result is the same."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from backend import launcher, runs
from tests.conftest import events, run_cli
from tests.lifecycle_helpers import demo_cfg
from tests.trainer_probe import start_probed

pytestmark = pytest.mark.train

STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _finish(v: Path, proc: subprocess.Popen) -> dict:
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        launcher.kill(v)
        proc.wait(timeout=30)
    return runs.finalize(v, proc.returncode)


@pytest.fixture(scope="module")
def machines(demo, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("machines")

    def config(out: Path, **launch):
        return launcher.absolutize(demo_cfg(demo, out, launch={"device": "cpu", "num_processes": 2, **launch},
                                            training={"max_train_epochs": None, "max_train_steps": STEPS},
                                            saving={"save_every_n_epochs": None, "save_last_n_epochs": None},
                                            logging={"tensorboard": False}))

    port = free_port()
    both = {"num_machines": 2, "main_process_ip": "127.0.0.1", "main_process_port": port}
    started = [start_probed(config(root / f"machine{r}" / "runs", machine_rank=r, **both)) for r in (0, 1)]
    statuses = [_finish(v, proc) for v, proc in started]
    for (v, _), st in zip(started, statuses, strict=True):
        assert st["state"] == "finished", (v, st, (v / "train.log").read_text()[-3000:])
    ref, proc = start_probed(config(root / "one-machine" / "runs", main_process_port=free_port()))
    assert _finish(ref, proc)["state"] == "finished", (ref / "train.log").read_text()[-3000:]
    return {"main": started[0][0], "worker": started[1][0], "ref": ref}


def test_every_machine_ends_finished_and_the_worker_names_the_main(machines):
    main, worker = machines["main"], machines["worker"]
    for v in (main, worker):
        assert runs.finalize(v, 0)["state"] == "finished" and runs.reconcile(v)["state"] == "finished"
        (info,) = runs.list_runs(v.parent.parent)
        assert info.state == "finished" and info.step == STEPS and info.total_steps == STEPS
    w, m = runs.read_status(worker), runs.read_status(main)
    host = socket.gethostname()
    assert (w["role"], w["machine_rank"], w["num_machines"]) == ("worker", 1, 2)
    assert (w["main_host"], w["main_version_dir"], w["exit_code"]) == (host, str(main), 0)
    assert w["heartbeat_at"] >= w["started_at"] and w["step"] == STEPS
    assert (m["role"], m["machine_rank"]) == ("main", 0)
    assert m["workers"] == [{"machine_rank": 1, "host": host, "version_dir": str(worker)}]
    (info,) = runs.list_runs(worker.parent.parent)
    assert info.role == "worker" and info.worker_of == f"machine 1, worker of {host}:{main}"
    listed = run_cli("runs", str(worker.parent.parent))
    assert listed.returncode == 0 and f"worker of {host}:{main}" in listed.stdout, listed.stdout
    # the worker's events: its start and end, marked; no steps (those are the main machine's)
    wev = events(worker)
    assert {e["event"] for e in wev} <= {"run_started", "run_finished", "warning", "resources"}
    (ws,) = events(worker, "run_started")
    assert (ws["role"], ws["main_version_dir"], ws["world_size"]) == ("worker", str(main), 2)
    (wf,) = events(worker, "run_finished")
    assert (wf["state"], wf["role"], wf["machine_rank"], wf["error"]) == ("finished", "worker", 1, None)
    (ms,) = events(main, "run_started")
    assert (ms["role"], ms["world_size"]) == ("main", 2)
    assert [e["step"] for e in events(main, "step")] == list(range(1, STEPS + 1))
    assert events(main)[-1]["event"] == "run_finished" and events(main)[-1]["role"] == "main"
    ref = runs.read_status(machines["ref"])  # one machine: no roles, no extra collective
    assert "role" not in ref and "role" not in events(machines["ref"], "run_started")[0]


def test_only_the_main_machine_writes_checkpoints_and_exports(machines):
    main, worker = machines["main"], machines["worker"]
    assert (main / "checkpoints" / "final" / "manifest.json").is_file()
    assert (main / "exports" / "demo.safetensors").is_file()
    for name in ("checkpoints", "exports", "samples", "tensorboard"):
        assert not (worker / name).exists() or not any((worker / name).iterdir()), name
    assert not list(worker.rglob("*.safetensors*")) or {p.parent.name for p in worker.rglob("*.safetensors*")} == {"probe"}


def test_two_machines_train_what_one_machine_with_two_processes_trains(machines):
    from safetensors.torch import load_file

    def same(a: dict, b: dict) -> list[str]:
        assert a.keys() == b.keys() and a
        return [k for k in a if (a[k].float() - b[k].float()).abs().max() > 1e-3 * max(b[k].abs().max().item(), 1e-12)]

    main, worker, ref = machines["main"], machines["worker"], machines["ref"]
    got, want = load_file(main / "probe" / "rank0.safetensors"), load_file(ref / "probe" / "rank0.safetensors")
    assert any(v.abs().max() > 0 for k, v in got.items() if "lora_B" in k)  # trained: lora_B starts at zero
    assert same(got, want) == []
    assert same(load_file(worker / "probe" / "rank1.safetensors"), got) == []  # the ranks agree across machines
    final, ref_final = (load_file(v / "checkpoints" / "final" / "lora.safetensors") for v in (main, ref))
    assert same(final, ref_final) == []
    losses = {e["step"]: e["loss"] for e in events(main, "step")}
    ref_losses = {e["step"]: e["loss"] for e in events(ref, "step")}
    assert losses.keys() == ref_losses.keys()
    assert all(abs(losses[k] - ref_losses[k]) <= 1e-4 * max(1.0, abs(ref_losses[k])) for k in losses)
