"""Checkpoint and export naming (contract), pure and torch-free.

State checkpoints live in <version>/checkpoints/<name>/, exports in <version>/exports/<file>:
  state:  epoch-000003, step-00000900, stop-00000950, final, best
  export: <run>-000003.safetensors, <run>-step00000900.safetensors, <run>.safetensors, <run>-best.safetensors
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("epoch", "step", "stop", "final", "best")


def state_name(kind: str, number: int | None = None) -> str:
    if kind == "epoch":
        return f"epoch-{number:06d}"
    if kind in ("step", "stop"):
        return f"{kind}-{number:08d}"
    if kind in ("final", "best"):
        return kind
    raise ValueError(f"unknown checkpoint kind {kind!r}")


def export_name(run_name: str, kind: str, number: int | None = None) -> str:
    if kind == "epoch":
        return f"{run_name}-{number:06d}.safetensors"
    if kind == "step":
        return f"{run_name}-step{number:08d}.safetensors"
    if kind == "stop":
        return f"{run_name}-stop{number:08d}.safetensors"
    if kind == "final":
        return f"{run_name}.safetensors"
    if kind == "best":
        return f"{run_name}-best.safetensors"
    raise ValueError(f"unknown export kind {kind!r}")


STATE_RE = re.compile(r"^(?:(epoch)-(\d{6})|(step|stop)-(\d{8})|(final|best))$")


def parse_state_name(name: str) -> tuple[str, int | None] | None:
    """('epoch', 3) for 'epoch-000003'; None for a name Lathe did not create."""
    m = STATE_RE.match(name)
    if not m:
        return None
    if m.group(1):
        return "epoch", int(m.group(2))
    if m.group(3):
        return m.group(3), int(m.group(4))
    return m.group(5), None


# ------------------------------------------------------------------------------------------ manifest

MANIFEST = "manifest.json"
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
STATUSES = ("valid", "incomplete", "corrupt", "config-mismatch")


# Every file of a checkpoint is listed in its manifest with its size and two digests of its bytes:
# sha256 (the contract: any tool can check it) and BLAKE3, which verification uses when an entry has
# it (several times faster than sha256 on a core, and as strong). Entries written before BLAKE3 was
# recorded are verified by their sha256.
try:
    import blake3 as _blake3
except ImportError:  # pragma: no cover - requirements.txt pins it; without it, sha256 only
    _blake3 = None
DIGESTS = ("sha256", "blake3") if _blake3 is not None else ("sha256",)


def _hasher(algo: str) -> Any:
    return _blake3.blake3() if algo == "blake3" else hashlib.sha256()


def verify_digest(meta: dict[str, Any]) -> str:
    """The digest a manifest entry is verified by: BLAKE3 when it has one, else sha256."""
    return "blake3" if "blake3" in DIGESTS and meta.get("blake3") else "sha256"


def digest_file(path: Path, algo: str = "sha256", chunk: int = 1 << 20) -> str:
    with open(path, "rb") as fh:
        h = _hasher(algo)
        if os.fstat(fh.fileno()).st_size >= MAP_MIN:
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
                h.update(m)
                return h.hexdigest()
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    return digest_file(path, "sha256", chunk)


def file_digests(path: Path) -> dict[str, str]:
    """Every digest a manifest records for the file at `path`."""
    return {algo: digest_file(path, algo) for algo in DIGESTS}


# File I/O, sha256 and BLAKE3 release the GIL, so files are written, read and hashed on several threads.
IO_THREADS = max(2, min(16, os.cpu_count() or 2))
MAP_MIN = 1 << 20  # files from this size on are hashed and read through a memory map (no copy)


def run_parallel(calls: list[Callable[[], Any]], threads: int = IO_THREADS) -> list[Any]:
    """Run the calls on up to `threads` threads (in the given order: biggest first balances best);
    their results in order. Every call has finished before the first error is raised, so nothing
    is still writing into a folder that the error is about to remove."""
    if len(calls) <= 1 or threads <= 1:
        return [c() for c in calls]
    with ThreadPoolExecutor(min(threads, len(calls)), thread_name_prefix="ckpt-io") as pool:
        futures = [pool.submit(c) for c in calls]
    return [f.result() for f in futures]


# Files written by `write_file` in this process: path -> (bytes, mtime_ns, digests). The manifest
# takes their hashes from here instead of reading them back (hash while writing, no second pass).
_WRITTEN: dict[str, tuple[int, int, str]] = {}


WRITE_CHUNK = 1 << 20  # one huge write() is several times slower than 1 MB writes on some kernels


class _ChunkHasher:
    """The manifest's digests of chunks handed over one by one, computed in a thread of its own
    (hashlib and BLAKE3 release the GIL), so hashing runs alongside the writes that produce them."""

    def __init__(self) -> None:
        import queue
        import threading

        self._chunks: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._h = {algo: _hasher(algo) for algo in DIGESTS}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            for h in self._h.values():
                h.update(chunk)

    def add(self, chunk: memoryview) -> None:
        self._chunks.put(chunk)

    def digests(self) -> dict[str, str]:
        """Wait for every chunk added so far; the digests (call once, at the end)."""
        self._chunks.put(None)
        self._thread.join()
        return {algo: h.hexdigest() for algo, h in self._h.items()}


def write_file(path: Path, data: bytes | bytearray | memoryview | list[Any]) -> None:
    """Write `data` (one buffer, or a list of buffers written back to back) to `path` durably
    (flushed and fsynced), hashing it while it is written: the digests run in a thread on the same
    chunks as the writes (both release the GIL), and are remembered for write_manifest. Files may be
    written by several threads at once (run_parallel)."""
    parts = data if isinstance(data, list) else [data]
    hasher = _ChunkHasher()
    try:
        with open(path, "wb", buffering=0) as fh:
            for part in parts:
                view = memoryview(part).cast("B")
                for k in range(0, len(view), WRITE_CHUNK):
                    chunk = view[k : k + WRITE_CHUNK]
                    hasher.add(chunk)
                    while chunk:  # an unbuffered write may be partial
                        chunk = chunk[fh.write(chunk) :]
            os.fsync(fh.fileno())
    finally:
        digests = hasher.digests()
    st = os.stat(path)
    _WRITTEN[str(path)] = (st.st_size, st.st_mtime_ns, digests)


def _known_digests(p: Path) -> dict[str, str] | None:
    """The digests write_file recorded for p, if the file is still exactly what it wrote."""
    known = _WRITTEN.pop(str(p), None)
    if known is None:
        return None
    st = p.stat()
    return known[2] if (st.st_size, st.st_mtime_ns) == known[:2] else None


def read_hashed(path: Path, algo: str = "sha256") -> tuple[bytearray | mmap.mmap, str]:
    """(the file's bytes, their `algo` digest), read once. A file of MAP_MIN bytes or more is a
    private (copy-on-write) memory map of the file, hashed in place: no copy and no zero-filled
    buffer, and tensors built over it read the page cache as safetensors' own loader does.
    Checkpoint files are never modified in place (atomic folders), so the bytes hashed are the bytes
    used."""
    h = _hasher(algo)
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size >= MAP_MIN:
            m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            h.update(m)
            return m, h.hexdigest()
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size and (n := fh.readinto(view[got:])):
            got += n
    h.update(view[:got])
    return (buf if got == size else buf[:got]), h.hexdigest()


def _differs(rel: str, algo: str) -> str:
    return f"{rel}: {algo} hash differs from the manifest (file changed or corrupt)"


class CorruptFile(Exception):
    """A checkpoint file differs from its manifest; the message names the file."""


class VerifiedReader:
    """Reads the files of a checkpoint folder once each: every read is checked against the manifest
    (size, digest) from the same bytes that are then deserialized, so verification costs no second
    pass. `prefetch()` reads and hashes the big files on several threads at once; `finish()` checks
    what was not read (small files), so the whole folder is verified."""

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder, self.manifest = folder, manifest
        self.read_names: set[str] = set()
        self._pending: dict[str, Future[Any]] = {}

    def prefetch(self) -> None:
        """Start reading and verifying every listed file of MAP_MIN bytes or more, biggest first, on
        IO_THREADS threads; `read` then waits for its own. (Small files are read when asked for.)"""
        files = self.manifest["files"]
        big = sorted((r for r, m in files.items() if (m.get("bytes") or 0) >= MAP_MIN), key=lambda r: -files[r]["bytes"])
        if not big:
            return
        pool = ThreadPoolExecutor(min(IO_THREADS, len(big)), thread_name_prefix="ckpt-read")
        self._pending = {rel: pool.submit(self._read, rel) for rel in big}
        pool.shutdown(wait=False)  # the threads end when the queued reads are done

    def read(self, rel: str) -> bytearray | mmap.mmap:
        pending = self._pending.pop(rel, None)
        data = pending.result() if pending is not None else self._read(rel)
        self.read_names.add(rel)
        return data

    def _read(self, rel: str) -> bytearray | mmap.mmap:
        meta = self.manifest["files"].get(rel)
        if meta is None:
            raise CorruptFile(f"{rel}: not listed in the manifest")
        algo = verify_digest(meta)
        try:
            data, digest = read_hashed(self.folder / rel, algo)
        except FileNotFoundError:
            raise CorruptFile(f"{rel}: missing") from None
        if len(data) != meta.get("bytes"):
            raise CorruptFile(f"{rel}: size {len(data)} != {meta.get('bytes')} in the manifest")
        if digest != meta.get(algo):
            raise CorruptFile(_differs(rel, algo))
        return data

    def finish(self) -> None:
        for rel in self.manifest["files"]:
            if rel not in self.read_names:
                self.read(rel)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in `folder` and write manifest.json last (fsynced). Returns the manifest.
    Files written with `write_file` are not read back: their hash was taken while writing."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            digests = _known_digests(p) or file_digests(p)
            files[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, **digests}
    manifest = {**info, "created": time.time(), "files": files}
    path = folder / MANIFEST
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    return manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None
    return data


def check_files(folder: Path, manifest: dict[str, Any], hashes: bool = True) -> list[str]:
    """Problems with the files a manifest lists: missing, wrong size, wrong hash. Empty means intact.
    The hashes are computed on IO_THREADS threads."""
    problems, to_hash = [], []
    for rel, meta in manifest["files"].items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != meta.get("bytes"):
            problems.append(f"{rel}: size {p.stat().st_size} != {meta.get('bytes')} in the manifest")
        elif hashes:
            to_hash.append(rel)
    to_hash.sort(key=lambda r: -(manifest["files"][r].get("bytes") or 0))
    algos = [verify_digest(manifest["files"][rel]) for rel in to_hash]
    digests = run_parallel([lambda p=folder / rel, a=a: digest_file(p, a) for rel, a in zip(to_hash, algos, strict=True)])
    problems += [_differs(rel, a) for rel, a, d in zip(to_hash, algos, digests, strict=True)
                 if d != manifest["files"][rel].get(a)]
    return problems


def epoch_label(manifest: dict[str, Any]) -> str:
    """A save's epoch as the Run tab and the step events count it: a save at an epoch's end says that
    epoch ("3"); a save inside an epoch says the epoch in progress and how far ("4 (2/16)"), not the
    epochs completed (the manifest's `epoch`)."""
    epoch, batch, per = manifest.get("epoch"), manifest.get("batch_in_epoch"), manifest.get("steps_per_epoch")
    if epoch is None:
        return ""
    if batch and per:
        return f"{epoch + 1} ({batch}/{per})"
    return str(epoch)


def checkpoint_status(folder: Path, config_hash: str | None = None, hashes: bool = True) -> tuple[str, list[str]]:
    """(status, problems): incomplete (no valid manifest), corrupt (files differ), config-mismatch, valid."""
    manifest = read_manifest(folder)
    if manifest is None:
        return "incomplete", ["no valid manifest.json (the save did not finish)"]
    problems = check_files(folder, manifest, hashes)
    if problems:
        return "corrupt", problems
    if config_hash is not None and manifest.get("config_hash") != config_hash:
        return "config-mismatch", ["saved with a different config than this run's config.json"]
    return "valid", []


# ------------------------------------------------------------------------------------ atomic writes
class AtomicDir:
    """Write a checkpoint folder atomically: fill `<name>.tmp/`, fsync, manifest last, rename into place.

    Replacing an existing folder (final, best) moves the old one to `<name>.old` first and removes it
    after the rename; `recover()` at the next start puts a `.old` back if the new one never arrived.
    """

    def __init__(self, parent: Path, name: str):
        self.parent, self.name = parent, name
        self.final = parent / name
        self.tmp = parent / (name + TMP_SUFFIX)

    def __enter__(self) -> Path:
        self.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def commit(self, info: dict[str, Any]) -> dict[str, Any]:
        for p in self.tmp.rglob("*"):
            if p.is_file() and str(p) not in _WRITTEN:  # write_file fsynced its own
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        manifest = write_manifest(self.tmp, info)
        fsync_dir(self.tmp)
        old = self.parent / (self.name + OLD_SUFFIX)
        if self.final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(self.final, old)
        os.rename(self.tmp, self.final)
        fsync_dir(self.parent)
        shutil.rmtree(old, ignore_errors=True)
        return manifest

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            inside = str(self.tmp) + os.sep
            for key in [k for k in _WRITTEN if k.startswith(inside)]:
                del _WRITTEN[key]


def recover(checkpoints_dir: Path) -> list[str]:
    """At start: remove stale `*.tmp` folders, restore a `.old` whose replacement never landed."""
    actions = []
    if not checkpoints_dir.is_dir():
        return actions
    for p in sorted(checkpoints_dir.iterdir()):
        if p.name.endswith(TMP_SUFFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            actions.append(f"removed unfinished save {p.name}")
        elif p.name.endswith(OLD_SUFFIX) and p.is_dir():
            target = checkpoints_dir / p.name[: -len(OLD_SUFFIX)]
            if target.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.rename(p, target)
                actions.append(f"restored {target.name} from an interrupted replacement")
    return actions


# ------------------------------------------------------------------------------------------ rotation
@dataclass(frozen=True)
class SavePoint:
    kind: str  # epoch | step | stop | final | best
    number: int | None
    name: str  # the state folder name (also identifies the export)


ROTATED = {"epoch": "save_last_n_epochs", "step": "save_last_n_steps"}


def plan_rotation(points: list[SavePoint], keep_epochs: int | None, keep_steps: int | None,
                  protected: frozenset[str] = frozenset()) -> list[SavePoint]:
    """Which save points to delete: beyond the newest N epoch (or step) saves. Pure.

    Never returns final, best or stop saves, nor anything named in `protected` (e.g. the checkpoint
    this run resumed from). `None` keeps everything of that kind.
    """
    doomed = []
    for kind, keep in (("epoch", keep_epochs), ("step", keep_steps)):
        if keep is None:
            continue
        mine = sorted((p for p in points if p.kind == kind and p.number is not None), key=lambda p: p.number, reverse=True)
        doomed += [p for p in mine[keep:] if p.name not in protected]
    return doomed


# ------------------------------------------------------------------------------------------- listing
def _version_dirs(path: Path) -> list[Path]:
    """A version folder itself, or every version_N folder of a run folder."""
    if (path / "checkpoints").is_dir() or (path / "config.json").is_file():
        return [path]
    found = [(int(m.group(1)), p) for p in path.iterdir() if p.is_dir() and (m := re.match(r"^version_(\d+)$", p.name))] \
        if path.is_dir() else []
    return [p for _, p in sorted(found)]


def _config_hash_of(version_dir: Path) -> str | None:
    try:
        from backend.config import TrainingConfig

        data = json.loads((version_dir / "config.json").read_text(encoding="utf-8"))
        return TrainingConfig.model_validate(data).config_hash()
    except Exception:  # noqa: BLE001 - an unreadable config just means no comparison
        return None


def list_checkpoints(path: str | Path, hashes: bool = True) -> list[dict[str, Any]]:
    """Every state checkpoint of a run or version folder, oldest first, with its status."""
    out = []
    for vdir in _version_dirs(Path(path)):
        cdir = vdir / "checkpoints"
        if not cdir.is_dir():
            continue
        cfg_hash = _config_hash_of(vdir)
        for folder in sorted(cdir.iterdir()):
            parsed = parse_state_name(folder.name)
            if parsed is None or not folder.is_dir():
                continue  # .tmp/.old leftovers and foreign folders are not checkpoints
            status, problems = checkpoint_status(folder, cfg_hash, hashes)
            m = read_manifest(folder) or {}
            out.append({
                "name": folder.name, "kind": parsed[0], "path": str(folder), "version": vdir.name,
                "step": m.get("step"), "epoch": m.get("epoch"), "batch_in_epoch": m.get("batch_in_epoch"),
                "steps_per_epoch": m.get("steps_per_epoch"), "loss": m.get("loss"), "val_loss": m.get("val_loss"),
                "bytes": sum(f.get("bytes", 0) for f in m.get("files", {}).values()) if m else None,
                "created": m.get("created"), "status": status, "problems": problems,
            })
    out.sort(key=lambda c: (c["created"] or 0.0, c["step"] or 0))
    return out


def latest(checkpoints: list[dict[str, Any]]) -> dict[str, Any] | None:
    """`last`: the newest valid checkpoint (by step, then time). A function, never a copy."""
    valid = [c for c in checkpoints if c["status"] == "valid"]
    return max(valid, key=lambda c: (c["step"] or 0, c["created"] or 0.0)) if valid else None


def best(checkpoints: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The valid checkpoint with the lowest validation loss, if any has one."""
    scored = [c for c in checkpoints if c["status"] == "valid" and c["val_loss"] is not None]
    return min(scored, key=lambda c: c["val_loss"]) if scored else None


# ------------------------------------------------------------------------------------------ removal
def remove_state_folder(folder: Path) -> None:
    """Delete a checkpoint folder so that it is never seen half-deleted: rename it to `<name>.tmp`
    first (never listed, and removed by `recover` if a crash interrupts the rmtree)."""
    trash = folder.with_name(folder.name + TMP_SUFFIX)
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def export_path(checkpoint: str | Path) -> Path | None:
    """The LoRA file saved together with a checkpoint (<version>/exports/<kohya name>), if it exists."""
    ck = Path(checkpoint)
    parsed = parse_state_name(ck.name)
    if parsed is None:
        return None
    run_name = (read_manifest(ck) or {}).get("run_name") or ck.parent.parent.parent.name
    path = ck.parent.parent / "exports" / export_name(run_name, parsed[0], parsed[1])
    return path if path.is_file() else None


def delete_checkpoint(checkpoint: str | Path) -> Path | None:
    """Delete a checkpoint folder and its export; returns the export removed (or None).
    Raises ValueError for anything that is not a Lathe checkpoint folder. The caller makes sure the
    run is not going (backend.runs / the GUI refuse that)."""
    ck = Path(checkpoint)
    if parse_state_name(ck.name) is None or ck.parent.name != "checkpoints" or not ck.is_dir():
        raise ValueError(f"{ck} is not a checkpoint folder")
    export = export_path(ck)
    remove_state_folder(ck)
    if export is not None:
        export.unlink(missing_ok=True)
    return export
