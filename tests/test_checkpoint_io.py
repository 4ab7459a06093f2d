"""Checkpoint file I/O: several files written, hashed and verified at once; the optimizer state split
over several files; checkpoints of the earlier layout (one optimizer.safetensors) still load."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch

from backend import checkpoints as C
from backend import hashed_io
from backend.trainer import state as ST
from backend.trainer import tensorfile


def adam_state(n: int = 12, size: int = 40_000) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"state": {i: {"step": torch.tensor(3.0), "exp_avg": torch.randn(size, generator=g),
                          "exp_avg_sq": torch.rand(size, generator=g)} for i in range(n)},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": list(range(n))}]}


def assert_same(back: dict, sd: dict) -> None:
    assert back["param_groups"] == sd["param_groups"] and set(back["state"]) == set(sd["state"])
    for i, st in sd["state"].items():
        assert all(torch.equal(back["state"][i][k], v) for k, v in st.items())


def load(folder: Path) -> dict:
    reader = C.VerifiedReader(folder, C.read_manifest(folder))
    reader.prefetch()
    sd = ST.load_optimizer(reader.read, reader.manifest["files"], reader.read_each)
    reader.finish()
    return sd


def save(parent: Path, name: str, write) -> Path:
    atomic = C.AtomicDir(parent, name)
    with atomic as tmp:
        write(tmp)
        atomic.commit({"run_name": "t"})
    return atomic.final


def test_a_big_optimizer_state_is_split_over_files_that_load_back_verified(tmp_path, monkeypatch):
    monkeypatch.setattr(ST, "OPTIMIZER_SHARD_BYTES", 1 << 20)  # 3.8 MB of moments: 4 files
    monkeypatch.setattr(hashed_io, "MAP_MIN", 1 << 18)  # the shards are read through memory maps
    sd = adam_state()
    folder = save(tmp_path, "step-00000001", lambda tmp: ST.save_optimizer(tmp, sd))
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["manifest.json", "optimizer-01.safetensors", "optimizer-02.safetensors",
                     "optimizer-03.safetensors", "optimizer.json", "optimizer.safetensors"]
    sizes = [(folder / f).stat().st_size for f in files if f.endswith(".safetensors")]
    assert max(sizes) < 1.3 * min(sizes)  # about equal, so their hashing balances over the threads
    assert_same(load(folder), sd)
    assert C.checkpoint_status(folder) == ("valid", [])
    data, sha = C.read_hashed(folder / "optimizer-02.safetensors")
    assert bytes(data) == (folder / "optimizer-02.safetensors").read_bytes()
    assert sha == hashlib.sha256(bytes(data)).hexdigest() == C.sha256_file(folder / "optimizer-02.safetensors")

    shard = folder / "optimizer-02.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(C.CorruptFile, match="optimizer-02.safetensors: xxh3_128 hash differs"):
        load(folder)
    assert C.checkpoint_status(folder)[0] == "corrupt"


def test_a_checkpoint_of_the_single_file_layout_still_loads(tmp_path, monkeypatch):
    """What save_optimizer wrote before shards: every tensor in optimizer.safetensors, one write after
    another; new code (prefetching, memory-mapped reads) restores it exactly."""
    monkeypatch.setattr(hashed_io, "MAP_MIN", 1 << 18)
    sd = adam_state()

    def old_layout(tmp: Path) -> None:
        skeleton, tensors = ST.split_state(sd)
        C.write_file(tmp / "lora.safetensors", tensorfile.buffers({"w": torch.randn(300, 300)}))
        C.write_file(tmp / "optimizer.safetensors", tensorfile.buffers(tensors))
        ST.save_json(tmp / "optimizer.json", skeleton, compact=True)
        ST.save_pickle(tmp / "rng.pt", [ST.rng_state()])

    folder = save(tmp_path, "epoch-000001", old_layout)
    assert_same(load(folder), sd)
    # A shard the manifest no longer lists (deleted with its entry) is refused, not half-loaded.
    monkeypatch.setattr(ST, "OPTIMIZER_SHARD_BYTES", 1 << 20)
    folder = save(tmp_path, "epoch-000002", lambda tmp: ST.save_optimizer(tmp, sd))
    manifest = C.read_manifest(folder)
    del manifest["files"]["optimizer-03.safetensors"]
    with pytest.raises(C.CorruptFile, match="optimizer.json: tensor .* is in no optimizer file"):
        reader = C.VerifiedReader(folder, manifest)
        ST.load_optimizer(reader.read, manifest["files"])


def test_parallel_writes_all_finish_before_a_failure_is_raised_and_leave_no_valid_folder(tmp_path):
    finished: list[str] = []
    started = threading.Barrier(2, timeout=10)

    def write(name: str, fail: bool = False):
        def go() -> None:
            started.wait()  # both run at the same time
            if fail:
                raise OSError(28, "No space left on device", name)
            C.write_file(atomic.tmp / name, b"y" * 3_000_000)
            finished.append(name)
        return go

    atomic = C.AtomicDir(tmp_path / "checkpoints", "step-00000002")
    with pytest.raises(OSError, match="No space left"), atomic:
        C.run_parallel([write("a.bin"), write("b.bin", fail=True)])
        atomic.commit({"run_name": "t"})
    assert finished == ["a.bin"] and not (tmp_path / "checkpoints" / "step-00000002").exists()
    assert not atomic.tmp.exists() and not [k for k in C._WRITTEN if k.startswith(str(atomic.tmp))]
    assert C.run_parallel([lambda i=i: i * i for i in range(5)]) == [0, 1, 4, 9, 16]


def test_shards_are_consecutive_and_about_equal(monkeypatch):
    monkeypatch.setattr(ST, "OPTIMIZER_SHARD_BYTES", 1000)
    tensors = {f"t{i}": torch.zeros(50) for i in range(20)}  # 4000 bytes: 4 shards
    groups = ST.shards(tensors)
    assert [list(g) for g in groups] == [[f"t{i}" for i in range(k, k + 5)] for k in (0, 5, 10, 15)]
    monkeypatch.setattr(ST, "OPTIMIZER_MAX_SHARDS", 3)
    assert len(ST.shards(tensors)) == 3 and sum(map(len, ST.shards(tensors))) == 20
    assert ST.shards({}) == [{}] and len(ST.shards({"x": torch.zeros(10)})) == 1
