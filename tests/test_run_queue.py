"""The run queue (backend/run_queue.py): the file and its edits, the worker's tick, the CLI, with the
real trainer on the tiny demo model where a run has to start or end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend import launcher, runs
from backend import run_queue as rq
from backend.presets import resolve
from tests.conftest import ENV, ROOT, demo_config, wait_for, write_config

QUICK = {
    "training": {"max_train_steps": 2, "max_train_epochs": None},
    "sampling": {"prompts": []},
    "logging": {"tensorboard": False},
    "saving": {"save_every_n_epochs": None, "save_last_n_epochs": None, "save_state": False, "save_on_stop": False},
}


def quick(demo: Path, out: Path, name: str, images: Path | None = None) -> dict:
    data = demo_config(demo, out, **QUICK)
    data["run_name"] = name
    if images is not None:
        data["dataset"]["train_data_dir"] = str(images)
    return data


def cfg_of(demo: Path, out: Path, name: str, images: Path | None = None):
    return resolve(quick(demo, out, name, images))


def doomed_images(demo: Path, tmp: Path, name: str) -> Path:
    """A copy of the demo images: valid when queued, removed before its turn."""
    return Path(shutil.copytree(demo / "images", tmp / name))


def queue_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m backend queue ...`"""
    return subprocess.run([sys.executable, "-m", "backend", "queue", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def states(out: Path) -> list[tuple[str, str]]:
    return [(e.label, e.state) for e in rq.load(out).entries]


# ------------------------------------------------------------------------------- no trainer
def test_queue_module_stays_light():
    """The GUI imports it: never torch, gradio or the trainer."""
    code = ("import sys, backend.run_queue; "
            "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'gradio') or m.startswith('backend.trainer')])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_add_checks_the_config_and_stores_it_with_absolute_paths(demo, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    monkeypatch.chdir(tmp_path)
    shutil.copytree(demo / "images", tmp_path / "imgs")
    eid = rq.add(out, cfg_of(demo, out, "rel", Path("imgs")))
    (entry,) = rq.load(out).entries
    assert (entry.id, entry.label, entry.state, entry.version_dir) == (eid, "rel", "queued", None)
    assert entry.config["dataset"]["train_data_dir"] == str((tmp_path / "imgs").resolve())
    assert resolve(entry.config) == launcher.absolutize(cfg_of(demo, out, "rel", tmp_path / "imgs"))
    doc = json.loads((out / "queue.json").read_text())
    assert {k: doc[k] for k in ("version", "paused", "stop_on_failure")} == {"version": 1, "paused": False,
                                                                             "stop_on_failure": False}

    # Refused at add time, with the preflight's lines: nothing is queued.
    with pytest.raises(rq.QueueRefused) as refused:
        rq.add(out, cfg_of(demo, out, "bad", tmp_path / "nowhere"))
    assert refused.value.lines == [f"dataset.train_data_dir: folder {tmp_path / 'nowhere'} does not exist"]
    with pytest.raises(rq.QueueRefused, match="this queue is in"):
        rq.add(tmp_path / "elsewhere", cfg_of(demo, out, "other"))
    assert [e.id for e in rq.load(out).entries] == [eid]


def test_move_remove_pause_and_the_settings(demo, tmp_path):
    out = tmp_path / "runs"
    a, b, c = (rq.add(out, cfg_of(demo, out, n)) for n in "abc")
    assert len({a, b, c}) == 3
    assert [e.id for e in rq.move(out, c, 1)] == [c, a, b]
    assert [e.id for e in rq.move(out, a, 3)] == [c, b, a]
    assert [e.label for e in rq.load(out).queued()] == ["c", "b", "a"]
    with pytest.raises(rq.QueueError, match="position 4 is out of range: 3 entries are queued"):
        rq.move(out, a, 4)
    assert rq.remove(out, b).label == "b"
    with pytest.raises(rq.QueueError, match="no entry nope in this queue"):
        rq.remove(out, "nope")
    rq.set_stop_on_failure(out, True)
    rq.pause(out)
    q = rq.load(out)
    assert (q.paused, q.stop_on_failure, [e.label for e in q.queued()]) == (True, True, ["c", "a"])

    # Paused: a tick starts nothing, however often.
    for _ in range(2):
        t = rq.tick(out)
        assert (t.events, t.running, t.queued, t.waiting) == ([], None, 2, "the queue is paused")
    assert not (out / "c").exists()
    rq.resume(out)
    assert not rq.load(out).paused

    # The CLI's bad input: exit 2 and a plain message; nothing changed.
    p = queue_cli("move", a, "9", "--output-dir", str(out))
    assert p.returncode == 2 and "position 9 is out of range" in p.stderr
    p = queue_cli("remove", "zzz", "--output-dir", str(out))
    assert p.returncode == 2 and "no entry zzz" in p.stderr
    p = queue_cli("list", "--output-dir", str(out))
    assert p.returncode == 0, p.stderr
    assert f"1. {c}  queued   c" in p.stdout and f"2. {a}  queued   a" in p.stdout and "stop on failure on" in p.stdout


def test_a_run_started_by_hand_keeps_the_queue_waiting(demo, tmp_path):
    out = tmp_path / "runs"
    eid = rq.add(out, cfg_of(demo, out, "queued"))
    hand = runs.create_version_dir(out, "by-hand")
    runs.new_status(hand)  # a launch under way: no process yet, within the starting grace
    t = rq.tick(out)
    assert t.events == [] and t.queued == 1 and t.waiting.startswith(f"a run is active in this output folder: {hand}")
    assert rq.load(out).get(eid).state == "queued" and not (out / "queued").exists()


def _write_queue(out: Path, entries: list[rq.Entry], **fields) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "queue.json").write_text(rq.Queue(entries=entries, **fields).text())


def test_ends_recorded_while_no_worker_was_alive(demo, tmp_path):
    """A worker reads the end of a run from its version folder, and an entry a dead worker had claimed
    without recording its start is matched to the version folder it made, or failed: never started twice."""
    out = tmp_path / "runs"
    cfg = launcher.absolutize(cfg_of(demo, out, "x")).model_dump(mode="json")
    failed = runs.create_version_dir(out, "x")
    runs.write_run_files(failed, resolve(cfg), ["true"])
    runs.new_status(failed)
    runs.close_run(failed, "failed", 1, "loss became nan at step 1")
    now = time.time()

    def entry(eid: str, state: str, **kw) -> rq.Entry:
        return rq.Entry(id=eid, label="x", added_at=now, state=state, config=cfg, **kw)

    _write_queue(out, [entry("e1", "running", version_dir=str(failed)), entry("e2", "running", claimed_at=now - 5),
                       entry("e3", "running", claimed_at=now + 5), entry("e4", "queued")], stop_on_failure=True)
    t = rq.tick(out)
    assert [(ev.kind, ev.entry_id) for ev in t.events] == [("failed", "e1"), ("paused", "e1"), ("failed", "e2"),
                                                        ("failed", "e3")]
    q = rq.load(out)
    assert q.get("e1").reason == "loss became nan at step 1" and q.get("e1").finished_at is not None
    assert q.get("e2").version_dir == str(failed) and q.get("e2").state == "failed"  # its launch did happen
    assert "the worker starting it stopped before its run began" in q.get("e3").reason
    assert q.paused and "e1 (x) failed and stop on failure is on" in q.paused_reason and q.get("e4").state == "queued"
    assert rq.clear_finished(out) == 3 and [e.id for e in rq.load(out).entries] == ["e4"]


@pytest.mark.parametrize("text, why", [("{not json", "it is not JSON"),
                                       ('{"version": 1, "entries": 5}', "entries: Input should be a valid list")])
def test_a_corrupt_queue_is_reported_and_kept_aside(tmp_path, text, why):
    out = tmp_path / "runs"
    out.mkdir()
    (out / "queue.json").write_text(text)
    p = queue_cli("list", "--output-dir", str(out))
    assert p.returncode == 1 and why in p.stderr and "kept aside as" in p.stderr, p.stderr
    (kept,) = out.glob("queue.json.corrupt-*")
    assert kept.read_text() == text and str(kept) in p.stderr and not (out / "queue.json").exists()
    assert rq.load(out).entries == []  # reported once; the queue then starts empty, the bad file stays


def test_a_newer_queue_format_is_left_alone(tmp_path):
    (tmp_path / "queue.json").write_text('{"version": 2, "entries": []}')
    with pytest.raises(rq.QueueFileError, match="written by a newer Lathe"):
        rq.tick(tmp_path)
    assert (tmp_path / "queue.json").is_file() and not list(tmp_path.glob("*.corrupt-*"))


# ------------------------------------------------------------------------------- real runs
TICKER = """
import json, sys, time
from backend import run_queue
at = float(sys.argv[2])
time.sleep(max(0.0, at - time.time()))
t = run_queue.tick(sys.argv[1])
print(json.dumps([[e.kind, e.entry_id] for e in t.events]))
"""


def test_refused_entry_fails_the_next_starts_once_and_stop_on_failure_pauses(demo, tmp_path):
    out = tmp_path / "runs"
    bad = rq.add(out, cfg_of(demo, out, "bad", doomed_images(demo, tmp_path, "imgs-bad")))
    good = rq.add(out, cfg_of(demo, out, "good"))
    shutil.rmtree(tmp_path / "imgs-bad")

    # Three workers (processes) tick at the same moment: the bad entry fails once, the good one starts once.
    at = str(time.time() + 3)
    procs = [subprocess.Popen([sys.executable, "-c", TICKER, str(out), at], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    happened = sorted(tuple(ev) for stdout, _ in results for ev in json.loads(stdout))
    assert happened == sorted([("failed", bad), ("started", good)])
    q = rq.load(out)
    reason = q.get(bad).reason
    assert reason.startswith("refused at start: dataset.train_data_dir: folder ") and "does not exist" in reason
    v = Path(q.get(good).version_dir)
    assert q.get(good).state == "running" and runs.version_dirs(out / "good") == [v] and not (out / "bad").exists()

    # Its run ends (killed here, to save time): the next tick records it.
    launcher.kill(v)
    t = rq.tick(out)
    assert [(ev.kind, ev.entry_id) for ev in t.events] == [("stopped", good)] and t.idle
    assert rq.load(out).get(good).reason.startswith("killed by request")

    # With stop on failure, a refused entry pauses the queue and the next one waits.
    rq.set_stop_on_failure(out, True)
    bad2 = rq.add(out, cfg_of(demo, out, "bad2", doomed_images(demo, tmp_path, "imgs-bad2")))
    next_ = rq.add(out, cfg_of(demo, out, "next"))
    shutil.rmtree(tmp_path / "imgs-bad2")
    wait_for(lambda: not rq.active_runs(out), timeout=30)
    t = rq.tick(out)
    assert [(ev.kind, ev.entry_id) for ev in t.events] == [("failed", bad2), ("paused", bad2)]
    assert t.paused and t.queued == 1 and t.idle and "stop on failure is on" in t.waiting
    assert rq.tick(out).events == [] and rq.load(out).get(next_).state == "queued" and not (out / "next").exists()
    p = queue_cli("run", "--output-dir", str(out))
    assert p.returncode == 0 and "queue paused: nothing more to start; 1 entries wait" in p.stdout, p.stdout + p.stderr


def test_cli_queue_of_two_runs_in_order_across_a_killed_worker(demo, tmp_path):
    """Filled from the CLI; the worker is SIGKILLed while the first runs (app.py restarting); the first
    run ends with no worker alive; a new worker records it, then starts and finishes the second."""
    out = tmp_path / "runs"
    c1 = write_config(tmp_path / "one.json", quick(demo, out, "one"))
    c2 = write_config(tmp_path / "two.json", quick(demo, out, "one"))
    added = [queue_cli("add", str(c1)), queue_cli("add", str(c2), "--set", "run_name=two")]
    assert all(p.returncode == 0 for p in added), [p.stderr for p in added]
    first, second = (p.stdout.split()[1] for p in added)
    assert states(out) == [("one", "queued"), ("two", "queued")]

    worker = subprocess.Popen([sys.executable, "-m", "backend", "queue", "run", "--output-dir", str(out)], cwd=ROOT,
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        v1 = Path(wait_for(lambda: rq.load(out).get(first).version_dir, timeout=60))
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.communicate(timeout=30)
    wait_for(lambda: runs.read_status(v1).get("state") in runs.FINAL_STATES and not rq.active_runs(out), timeout=120)
    assert states(out) == [("one", "running"), ("two", "queued")] and not (out / "two").exists()

    p = queue_cli("run", "--output-dir", str(out), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith(f"done {first} one: finished at step 2 ({v1})")
    assert lines[1].startswith(f"started {second} two: ") and lines[-2].startswith(f"done {second} two: finished")
    assert lines[-1] == "queue empty: nothing more to start"
    q = rq.load(out)
    v2 = Path(q.get(second).version_dir)
    assert states(out) == [("one", "done"), ("two", "done")] and v2 == out / "two" / "version_0"
    s1, s2 = runs.read_status(v1), runs.read_status(v2)
    assert s1["state"] == s2["state"] == "finished" and s1["step"] == s2["step"] == 2
    assert s1["started_at"] < s1["finished_at"] <= s2["started_at"] < s2["finished_at"]
    assert q.get(first).finished_at == s1["finished_at"] and q.get(second).started_at == s2["started_at"]


def test_threads_ticking_at_once_record_a_refusal_once(demo, tmp_path):
    """The GUI's thread and another in the same process each take the flock on a descriptor of their own."""
    import threading

    out = tmp_path / "runs"
    bad = rq.add(out, cfg_of(demo, out, "bad", doomed_images(demo, tmp_path, "imgs")))
    shutil.rmtree(tmp_path / "imgs")
    barrier, seen = threading.Barrier(4), []

    def work() -> None:
        barrier.wait()
        seen.extend((ev.kind, ev.entry_id) for ev in rq.tick(out).events)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == [("failed", bad)] and states(out) == [("bad", "failed")]
