"""The run queue: configs that wait their turn in one output folder and start one after another.

The queue is one file, `<output_dir>/queue.json`, edited under an flock on `<output_dir>/.queue.lock`
(queue.json is replaced atomically on every write, so its own inode cannot carry the lock). Its
state lives only there and in the run folders: any process may work it (the GUI's background
thread, `python -m backend queue run`), and a worker that dies leaves nothing a new one cannot pick
up. `tick` is one round of work: record how running entries ended, then start the next queued
entry when no run is active in the output folder (a run started by hand counts). It holds the
queue lock from reading the queue to recording the start, so workers ticking at the same moment
start an entry once.

A config is checked when it is added (the same checks as the GUI's Start, `start_problems`) and
refused with their lines, and checked again when its turn comes: what fails then (its image folder
was removed, say) marks the entry failed with the reason. Torch-free and Gradio-free.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from backend import launcher, lock, process_tree, runs
from backend.config import ConfigError, TrainingConfig
from backend.preflight import start_problems

QUEUE_FILE = "queue.json"
LOCK_FILE = ".queue.lock"
FORMAT_VERSION = 1
LOCK_TIMEOUT_S = 30.0  # a tick holds the lock for a launch (well under a second); longer means a hung holder
DEFAULT_OUTPUT_DIR = TrainingConfig.model_fields["output_dir"].default
FINISHED = ("done", "failed", "stopped")
ENTRY_STATE = {"finished": "done", "failed": "failed", "stopped": "stopped"}  # the run's final state -> the entry's
ACTIVE_RUN_STATES = ("starting", "running", "stopping")
EntryState = Literal["queued", "running", "done", "failed", "stopped"]


class QueueError(Exception):
    """Bad input (unknown id, an entry in the wrong state, a position out of range): nothing changed."""


class QueueRefused(QueueError):
    """A config the queue does not take; `lines` are `path: message` strings."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


class QueueFileError(QueueError):
    """queue.json cannot be read or locked (the message says whether it was kept aside)."""


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    label: str  # the run name
    added_at: float
    state: EntryState
    config: dict[str, Any]  # TrainingConfig.model_dump(mode="json"), paths absolute
    version_dir: str | None = None  # set once its run is started
    claimed_at: float | None = None  # when a worker took it, just before the launch
    started_at: float | None = None
    finished_at: float | None = None
    reason: str | None = None  # why it failed or was refused; how it ended otherwise


class Queue(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = FORMAT_VERSION
    paused: bool = False
    paused_reason: str | None = None  # set when stop_on_failure paused it; None for a pause by request
    stop_on_failure: bool = False
    entries: list[Entry] = []
    _saved: str = PrivateAttr("")  # the text last read or written: a write happens only on a change

    def queued(self) -> list[Entry]:
        return [e for e in self.entries if e.state == "queued"]

    def running(self) -> Entry | None:
        return next((e for e in self.entries if e.state == "running"), None)

    def get(self, entry_id: str) -> Entry:
        for e in self.entries:
            if e.id == entry_id:
                return e
        raise QueueError(f"no entry {entry_id} in this queue; `python -m backend queue list` shows the ids")

    def text(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1) + "\n"


# ------------------------------------------------------------------------------------ the file
def queue_path(output_dir: str | Path) -> Path:
    return Path(output_dir).expanduser() / QUEUE_FILE


@contextlib.contextmanager
def _locked(output_dir: str | Path) -> Iterator[None]:
    root = Path(output_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise QueueFileError(f"the queue in {root} stayed locked by another process for "
                                         f"{LOCK_TIMEOUT_S:.0f} s; try again") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # also releases the flock


def _read(output_dir: str | Path) -> Queue:
    """The queue (empty when there is no file). A file that is not a queue is moved aside."""
    path = queue_path(output_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Queue()
    except OSError as e:
        raise QueueFileError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _set_aside(path, f"it is not JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("version"), int) and data["version"] > FORMAT_VERSION:
        raise QueueFileError(f"{path} is queue format {data['version']}, written by a newer Lathe (this one reads "
                             f"format {FORMAT_VERSION}); it was left as it is")
    try:
        q = Queue.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "the top level"
        raise _set_aside(path, f"{where}: {err['msg']}") from None
    q._saved = q.text()
    return q


def _set_aside(path: Path, why: str) -> QueueFileError:
    kept = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while kept.exists():
        kept, n = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    try:
        os.replace(path, kept)
    except OSError as e:
        return QueueFileError(f"{path} is not a readable queue ({why}), and it could not be kept aside as {kept} "
                              f"({e.strerror or e}); move it away yourself to start a new queue")
    return QueueFileError(f"{path} is not a readable queue ({why}); it was kept aside as {kept} and the queue "
                          "starts empty; its runs are untouched (see `python -m backend runs`)")


def _write(output_dir: str | Path, q: Queue) -> None:
    text = q.text()
    if text != q._saved:
        runs.atomic_write_text(queue_path(output_dir), text)
        q._saved = text


@contextlib.contextmanager
def _editing(output_dir: str | Path) -> Iterator[Queue]:
    """The queue under its lock; written back (atomically) when the block changed it and did not raise."""
    with _locked(output_dir):
        q = _read(output_dir)
        yield q
        _write(output_dir, q)


# ------------------------------------------------------------------------------------ editing
def load(output_dir: str | Path) -> Queue:
    """The queue as it is now (read under the lock); an empty queue when there is none."""
    if not queue_path(output_dir).exists():
        return Queue()
    with _locked(output_dir):
        return _read(output_dir)


def add(output_dir: str | Path, cfg: TrainingConfig) -> str:
    """Queue cfg (paths made absolute) and return the new entry's id. Refuses (QueueRefused, with
    `start_problems`' lines) a config that could not start now, and one whose output_dir is not
    this queue's folder (its run would not wait for this folder's runs)."""
    cfg = launcher.absolutize(cfg)
    root = Path(output_dir).expanduser().resolve()
    if Path(cfg.output_dir).resolve() != root:
        raise QueueRefused([f"output_dir: the config writes its runs to {cfg.output_dir}, but this queue is in "
                            f"{root}; queue it there, or set output_dir to {root}"])
    problems = start_problems(cfg)
    if problems:
        raise QueueRefused(problems)
    with _editing(root) as q:
        taken = {e.id for e in q.entries}
        eid = next(i for i in (uuid.uuid4().hex[:8] for _ in range(100)) if i not in taken)
        q.entries.append(Entry(id=eid, label=cfg.run_name, added_at=time.time(), state="queued",
                               config=cfg.model_dump(mode="json")))
    return eid


def remove(output_dir: str | Path, entry_id: str) -> Entry:
    """Take a queued entry out of the queue; returns it."""
    with _editing(output_dir) as q:
        e = _queued(q, entry_id, "removed")
        q.entries.remove(e)
    return e


def move(output_dir: str | Path, entry_id: str, position: int) -> list[Entry]:
    """Put a queued entry at `position` (1 = starts next) among the queued entries; returns them in
    their new order. Entries that ran keep their places."""
    with _editing(output_dir) as q:
        e = _queued(q, entry_id, "moved")
        waiting = q.queued()
        if not 1 <= position <= len(waiting):
            raise QueueError(f"position {position} is out of range: {len(waiting)} entries are queued "
                             f"(positions 1 to {len(waiting)})")
        slots = [i for i, x in enumerate(q.entries) if x.state == "queued"]
        waiting.remove(e)
        waiting.insert(position - 1, e)
        for i, x in zip(slots, waiting, strict=True):
            q.entries[i] = x
    return waiting


def _queued(q: Queue, entry_id: str, verb: str) -> Entry:
    e = q.get(entry_id)
    if e.state != "queued":
        hint = (f"; stop its run with `python -m backend stop {e.version_dir}`" if e.state == "running" and e.version_dir
                else "; `python -m backend queue clear` removes finished entries" if e.state in FINISHED else "")
        raise QueueError(f"entry {entry_id} ({e.label}) is {e.state}: only a queued entry can be {verb}{hint}")
    return e


def pause(output_dir: str | Path, reason: str | None = None) -> None:
    """Start nothing more (a running entry runs on and is recorded when it ends)."""
    with _editing(output_dir) as q:
        q.paused, q.paused_reason = True, reason


def resume(output_dir: str | Path) -> None:
    """Go on starting queued entries (also after stop_on_failure paused the queue)."""
    with _editing(output_dir) as q:
        q.paused, q.paused_reason = False, None


def set_stop_on_failure(output_dir: str | Path, on: bool) -> None:
    """With it on, an entry that fails (or is refused when its turn comes) pauses the queue."""
    with _editing(output_dir) as q:
        q.stop_on_failure = bool(on)


def clear_finished(output_dir: str | Path) -> int:
    """Drop the done, failed and stopped entries (their run folders stay); returns how many."""
    with _editing(output_dir) as q:
        before = len(q.entries)
        q.entries = [e for e in q.entries if e.state not in FINISHED]
        return before - len(q.entries)


# ------------------------------------------------------------------------------------ the worker
@dataclass
class QueueEvent:
    """One thing a tick did. kind: started | done | failed | stopped | paused."""

    kind: str
    entry_id: str
    label: str
    message: str
    version_dir: str | None = None

    def line(self) -> str:
        return f"{self.kind} {self.entry_id} {self.label}: {self.message}"


@dataclass
class Tick:
    events: list[QueueEvent] = field(default_factory=list)
    running: Entry | None = None  # the entry whose run is active now
    queued: int = 0  # entries still waiting
    paused: bool = False
    waiting: str | None = None  # why the next queued entry did not start (a run is active, paused)

    @property
    def idle(self) -> bool:
        """Nothing runs and nothing will start by itself."""
        return self.running is None and (self.queued == 0 or self.paused)


_children: list[subprocess.Popen] = []  # runs this process started: polled so none stays a zombie
_children_lock = threading.Lock()


def tick(output_dir: str | Path) -> Tick:
    """One round of work; safe to call repeatedly, from any number of processes and threads."""
    with _children_lock:
        _children[:] = [p for p in _children if p.poll() is None]
    if not queue_path(output_dir).exists():
        return Tick()
    root = Path(output_dir).expanduser()
    with _editing(root) as q:
        events = [ev for e in q.entries if e.state == "running" for ev in _settle(q, e)]
        waiting = None
        while not q.paused and q.running() is None and q.queued():
            busy = active_runs(root)
            if busy:
                state = runs.read_status(busy[0]).get("state")
                how = "its processes are exiting" if state in runs.FINAL_STATES else state
                waiting = f"a run is active in this output folder: {busy[0]} ({how})"
                break
            started, why = _start(root, q, q.queued()[0])
            events += started
            waiting = why
            if why:
                break
        if q.paused and q.queued():
            waiting = "the queue is paused" + (f": {q.paused_reason}" if q.paused_reason else "")
        return Tick(events, q.running(), len(q.queued()), q.paused, waiting)


def active_runs(output_dir: str | Path) -> list[Path]:
    """The version folders in output_dir whose run is active (reconciled, so a dead run is not),
    plus any still holding a device lock with live processes (a run that has just ended)."""
    found = [Path(i.path) for i in runs.list_runs(output_dir) if i.state in ACTIVE_RUN_STATES]
    for rec in sorted((Path(output_dir) / lock.LOCK_DIR).glob("*.json")):
        try:
            v = json.loads(rec.read_text(encoding="utf-8")).get("version_dir")
        except (OSError, ValueError, AttributeError):
            continue
        if v and Path(v) not in found and process_tree.find_for_status(runs.read_status(v)):
            found.append(Path(v))
    return found


def _settle(q: Queue, e: Entry) -> list[QueueEvent]:
    """Record how a running entry's run ended, if it has."""
    if e.version_dir is None:  # its worker died between claiming it and recording the start
        found = _started_version(e)
        if found is None:
            return _fail(q, e, "the worker starting it stopped before its run began (no version folder was "
                               "made); add it again to retry")
        e.version_dir = str(found)
    v = Path(e.version_dir)
    status = runs.reconcile(v)
    if not status:
        what = "has no status.json" if v.is_dir() else "is gone"
        return _fail(q, e, f"its version folder {v} {what}")
    state = status.get("state")
    if state not in runs.FINAL_STATES:
        return []
    if state == "failed":
        return _fail(q, e, status.get("error") or "the run failed", status.get("finished_at"))
    e.state, e.finished_at = ENTRY_STATE[state], status.get("finished_at") or time.time()
    e.reason = status.get("error") or f"finished at step {status.get('step', 0)}"
    return [QueueEvent(e.state, e.id, e.label, f"{e.reason} ({v})", str(v))]


def _started_version(e: Entry) -> Path | None:
    """The version folder a launch made for e after it was claimed, found by its config and time."""
    for v in runs.version_dirs(Path(e.config["output_dir"]) / e.label):
        started = runs.read_status(v).get("started_at") or 0
        with contextlib.suppress(OSError, ValueError):
            if started >= (e.claimed_at or 0) - 1 and json.loads((v / "config.json").read_text("utf-8")) == e.config:
                return v
    return None


def _fail(q: Queue, e: Entry, reason: str, at: float | None = None) -> list[QueueEvent]:
    e.state, e.reason, e.finished_at = "failed", reason, at or time.time()
    events = [QueueEvent("failed", e.id, e.label, reason, e.version_dir)]
    if q.stop_on_failure and not q.paused:
        q.paused, q.paused_reason = True, f"entry {e.id} ({e.label}) failed and stop on failure is on"
        events.append(QueueEvent("paused", e.id, e.label, q.paused_reason))
    return events


def _start(root: Path, q: Queue, e: Entry) -> tuple[list[QueueEvent], str | None]:
    """Check and launch e: (events, None) when it started or failed, ([], why) when it must wait."""
    from backend.presets import resolve

    try:
        cfg = resolve(e.config)  # migrates a config queued by an older Lathe
    except ConfigError as err:
        return _fail(q, e, "its config is no longer valid: " + "; ".join(err.lines)), None
    problems = start_problems(cfg)
    if problems:
        return _fail(q, e, "refused at start: " + "; ".join(problems)), None
    e.state, e.claimed_at = "running", time.time()
    _write(root, q)  # claimed on disk before the launch: a worker dying now can never start it twice
    try:
        launched = launcher.launch(cfg)
    except lock.RunBusyError as err:  # a run started by hand in between
        e.state, e.claimed_at = "queued", None
        return [], str(err)
    except OSError as err:
        return _fail(q, e, f"could not start the trainer: {err}"), None
    with _children_lock:
        _children.append(launched.proc)
    v = launched.version_dir
    e.version_dir, e.started_at = str(v), runs.read_status(v).get("started_at") or time.time()
    return [QueueEvent("started", e.id, e.label, str(v), str(v))], None


def run_worker(output_dir: str | Path, once: bool = False, poll_s: float = 1.0) -> int:
    """`queue run`: tick until nothing runs and nothing will start (or once), one line per event.
    Ctrl+C ends the worker only: a running trainer runs on. Exit 0, 1 when an entry failed, 130 on Ctrl+C."""
    interrupted: list[int] = []
    on_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, lambda *_: interrupted.append(1)) if on_main else None
    failed, said = False, None
    try:
        while True:
            t = tick(output_dir)
            for ev in t.events:
                print(ev.line(), flush=True)
                failed = failed or ev.kind == "failed"
            if t.waiting and t.waiting != said:
                print(f"waiting: {t.waiting}", flush=True)
            said = t.waiting
            if once or t.idle:
                break
            end = time.monotonic() + poll_s
            while not interrupted and time.monotonic() < end:
                time.sleep(0.05)
            if interrupted:
                run = f"; its run keeps running: {t.running.version_dir}" if t.running else ""
                print(f"worker stopped by Ctrl+C{run}. `python -m backend queue run` (or the GUI) records it and "
                      "goes on", flush=True)
                return 130
    finally:
        if on_main:
            signal.signal(signal.SIGINT, old)
    if not once:
        left = f"; {t.queued} entries wait: `python -m backend queue resume` to go on" if t.paused and t.queued else ""
        print(f"queue {'paused' if t.paused and t.queued else 'empty'}: nothing more to start{left}", flush=True)
    return 1 if failed else 0
