"""Checkpoint files written durably while they are hashed, and read once and verified (pure, no
torch): the digests a manifest lists (backend/checkpoints.py holds the manifest itself), the
I/O threads, `write_file` (fsynced, hashed from the same chunks as written; `write_durable` is the
same write without digests) and `VerifiedReader` (each file read once; its size and digest checked
on the bytes that are then deserialized).
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

# Every file of a checkpoint is listed in its manifest with its size and two digests of its bytes:
# sha256 (the contract: any tool can check it) and XXH3-128, which loads, `verify` and the listings
# check. The manifest is not signed, so whoever can change a file can change its entry too: what the
# check guards against is damage (a flipped bit, a truncated or half-copied file), and a 128-bit
# checksum misses random damage with odds of 2^-128, as a cryptographic hash does, at several times
# the speed (XXH3 runs at memory speed; btrfs, RocksDB and zstd check their data with xxHash).
# Entries that lack it (Lathe before 2026-12-04; BLAKE3 is no longer read) are checked by sha256.
try:
    import xxhash as _xxhash
except ImportError:  # pragma: no cover - requirements.txt pins it; without it, sha256 only
    _xxhash = None
DIGESTS = ("sha256", "xxh3_128") if _xxhash is not None else ("sha256",)


def _hasher(algo: str) -> Any:
    return _xxhash.xxh3_128() if algo == "xxh3_128" else hashlib.sha256()


def verify_digest(meta: dict[str, Any]) -> str:
    """The digest a manifest entry is verified by: XXH3-128 when it has one, else sha256."""
    return "xxh3_128" if "xxh3_128" in DIGESTS and meta.get("xxh3_128") else "sha256"


def digest_file(path: Path, algo: str = "sha256") -> str:
    return _digest(read_bytes(path), algo)


def sha256_file(path: Path) -> str:
    return digest_file(path, "sha256")


def file_digests(path: Path) -> dict[str, str]:
    """Every digest a manifest records for the file at `path` (read once)."""
    data = read_bytes(path)
    return {algo: _digest(data, algo) for algo in DIGESTS}


# File I/O, sha256 and XXH3 release the GIL, so files are written, read and hashed on several threads.
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
_WRITTEN: dict[str, tuple[int, int, dict[str, str]]] = {}


WRITE_CHUNK = 1 << 20  # one huge write() is several times slower than 1 MB writes on some kernels


class _ChunkHasher:
    """The manifest's digests of chunks handed over one by one, computed in a thread of its own
    (hashlib and xxhash release the GIL), so hashing runs alongside the writes that produce them."""

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
    hasher = _ChunkHasher()
    try:
        write_durable(path, data, hasher.add)
    finally:
        digests = hasher.digests()
    st = os.stat(path)
    _WRITTEN[str(path)] = (st.st_size, st.st_mtime_ns, digests)


def write_durable(path: Path, data: bytes | bytearray | memoryview | list[Any],
                  each_chunk: Callable[[memoryview], None] | None = None) -> None:
    """Write `data` (one buffer, or buffers back to back) to `path` in WRITE_CHUNK pieces straight from
    their memory, then fsync; `each_chunk` sees every piece before it is written."""
    with open(path, "wb", buffering=0) as fh:
        for part in data if isinstance(data, list) else [data]:
            view = memoryview(part).cast("B")
            for k in range(0, len(view), WRITE_CHUNK):
                chunk = view[k : k + WRITE_CHUNK]
                if each_chunk is not None:
                    each_chunk(chunk)
                while chunk:  # an unbuffered write may be partial
                    chunk = chunk[fh.write(chunk) :]
        os.fsync(fh.fileno())


def known_digests(p: Path) -> dict[str, str] | None:
    """The digests write_file recorded for p, if the file is still exactly what it wrote."""
    known = _WRITTEN.pop(str(p), None)
    if known is None:
        return None
    st = p.stat()
    return known[2] if (st.st_size, st.st_mtime_ns) == known[:2] else None


def read_bytes(path: Path) -> bytearray | mmap.mmap:
    """The file's bytes, read once. A file of MAP_MIN bytes or more is a private (copy-on-write)
    memory map of the file: no copy and no zero-filled buffer, and tensors built over it read the
    page cache as safetensors' own loader does. Checkpoint files are never modified in place
    (atomic folders), so the bytes hashed are the bytes used."""
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size >= MAP_MIN:
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size and (n := fh.readinto(view[got:])):
            got += n
    return buf if got == size else buf[:got]


def _digest(data: bytearray | mmap.mmap, algo: str) -> str:
    h = _hasher(algo)
    h.update(data)
    return h.hexdigest()


def read_hashed(path: Path, algo: str = "sha256") -> tuple[bytearray | mmap.mmap, str]:
    """(the file's bytes (read_bytes), their `algo` digest), read once and hashed in place."""
    data = read_bytes(path)
    return data, _digest(data, algo)


def mismatch(rel: str, algo: str) -> str:
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

    def read_each(self, rels: list[str]) -> Iterator[tuple[str, bytearray | mmap.mmap]]:
        """(name, bytes) of each of `rels`, verified as by `read`: the prefetched ones in the order
        their reads finish (so each is deserialized while the others are still being hashed), then
        the rest in the given order."""
        pending = {self._pending[rel]: rel for rel in rels if rel in self._pending}
        for future in as_completed(pending):
            yield pending[future], self.read(pending[future])
        for rel in rels:
            if rel not in self.read_names:
                yield rel, self.read(rel)

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
            raise CorruptFile(mismatch(rel, algo))
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
