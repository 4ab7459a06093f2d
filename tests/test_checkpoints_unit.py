"""Pure checkpoint logic: names, manifests, atomic folders, recovery, rotation, resume preflight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend import checkpoints as C
from backend.presets import resolve
from backend.resume import dataset_fingerprint, plan_resume


def test_names_round_trip_and_foreign_names_are_rejected():
    for kind, n in (("epoch", 3), ("step", 900), ("stop", 950), ("final", None), ("best", None)):
        assert C.parse_state_name(C.state_name(kind, n)) == (kind, n)
    assert C.state_name("epoch", 3) == "epoch-000003" and C.state_name("step", 900) == "step-00000900"
    assert C.export_name("demo", "epoch", 3) == "demo-000003.safetensors"
    assert C.export_name("demo", "step", 900) == "demo-step00000900.safetensors"
    assert C.export_name("demo", "final") == "demo.safetensors" and C.export_name("demo", "best") == "demo-best.safetensors"
    for foreign in ("epoch-3", "epoch-000003.tmp", "step-0000090", "my-epoch-000003", "final.old", "latest"):
        assert C.parse_state_name(foreign) is None


def make_ckpt(parent: Path, name: str, info: dict | None = None) -> Path:
    atomic = C.AtomicDir(parent, name)
    with atomic as tmp:
        (tmp / "a.bin").write_bytes(b"\x00" * 100)
        (tmp / "config.json").write_text("{}")
        atomic.commit(info or {"run_name": "r", "step": 1})
    return atomic.final


def test_manifest_detects_a_flipped_byte_and_a_missing_file(tmp_path):
    ck = make_ckpt(tmp_path, "epoch-000001")
    assert C.checkpoint_status(ck) == ("valid", [])
    data = bytearray((ck / "a.bin").read_bytes())
    data[50] ^= 0x01
    (ck / "a.bin").write_bytes(bytes(data))
    status, problems = C.checkpoint_status(ck)
    assert status == "corrupt" and "a.bin: xxh3_128 hash differs" in problems[0]
    (ck / "a.bin").unlink()
    assert C.checkpoint_status(ck)[0] == "corrupt"
    (ck / "manifest.json").write_text("{trunc")
    assert C.checkpoint_status(ck)[0] == "incomplete"


def test_atomic_dir_leaves_nothing_on_failure_and_replaces_whole(tmp_path):
    with pytest.raises(RuntimeError), C.AtomicDir(tmp_path, "best") as tmp:
        (tmp / "x").write_text("half")
        raise RuntimeError("crash during save")
    assert list(tmp_path.iterdir()) == []
    make_ckpt(tmp_path, "best", {"step": 1})
    make_ckpt(tmp_path, "best", {"step": 2})
    assert C.read_manifest(tmp_path / "best")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_recover_removes_tmp_and_restores_an_interrupted_replacement(tmp_path):
    make_ckpt(tmp_path, "best", {"step": 5})
    (tmp_path / "best").rename(tmp_path / "best.old")  # crash after moving the old one aside...
    (tmp_path / "final.tmp").mkdir()  # ...and a save that never finished
    notes = C.recover(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"] and len(notes) == 2
    assert C.checkpoint_status(tmp_path / "best")[0] == "valid"


def test_listing_latest_and_best(tmp_path):
    v = tmp_path / "run" / "version_0"
    (v / "checkpoints").mkdir(parents=True)
    make_ckpt(v / "checkpoints", "epoch-000001", {"run_name": "r", "step": 10, "val_loss": 0.5})
    make_ckpt(v / "checkpoints", "epoch-000002", {"run_name": "r", "step": 20, "val_loss": 0.7})
    (v / "checkpoints" / "step-00000030").mkdir()  # incomplete: no manifest
    (v / "checkpoints" / "notes").mkdir()  # foreign: not listed
    cks = C.list_checkpoints(tmp_path / "run")
    assert [(c["name"], c["status"]) for c in cks] == [
        ("step-00000030", "incomplete"), ("epoch-000001", "valid"), ("epoch-000002", "valid")]
    assert C.latest(cks)["name"] == "epoch-000002"  # the incomplete, newer one is never "latest"
    assert C.best(cks)["name"] == "epoch-000001"


points = st.lists(
    st.tuples(st.sampled_from(["epoch", "step", "stop", "final", "best"]), st.integers(1, 60)), max_size=40, unique=True)


@settings(max_examples=300, deadline=None)
@given(points, st.one_of(st.none(), st.integers(1, 6)), st.one_of(st.none(), st.integers(1, 6)), st.data())
def test_rotation_property(raw, keep_e, keep_s, data):
    pts = [C.SavePoint(k, None if k in ("final", "best") else n, C.state_name(k, None if k in ("final", "best") else n))
           for k, n in raw]
    pts = list(dict.fromkeys(pts))
    protected = frozenset(data.draw(st.sets(st.sampled_from([p.name for p in pts])))) if pts else frozenset()
    doomed = C.plan_rotation(pts, keep_e, keep_s, protected)
    assert all(p.kind in ("epoch", "step") for p in doomed)  # never final, best or stop
    assert not {p.name for p in doomed} & protected  # never the protected (resumed-from) one
    for kind, keep in (("epoch", keep_e), ("step", keep_s)):
        mine = [p for p in pts if p.kind == kind]
        kept = [p for p in mine if p not in doomed]
        if keep is None:
            assert kept == mine
            continue
        newest = sorted(mine, key=lambda p: p.number, reverse=True)[:keep]
        assert all(p in kept for p in newest)  # always keeps the newest N
        assert len([p for p in kept if p.name not in protected]) <= keep  # never more than N (besides protected)


def test_resume_preflight_lists_allowed_changes_and_refuses_frozen_ones(tmp_path):
    data_dir = tmp_path / "data" / "1_a"
    data_dir.mkdir(parents=True)
    (data_dir / "x.png").write_bytes(b"png")
    old = resolve({"dataset": {"train_data_dir": str(tmp_path / "data")}, "training": {"max_train_epochs": 4}})
    ck = make_ckpt(tmp_path, "epoch-000002", {"run_name": "lora", "step": 8, "epoch": 2, "steps_per_epoch": 4,
                                              "dataset_fingerprint": dataset_fingerprint(old.dataset)})
    (ck / "config.json").write_text(json.dumps(old.model_dump(mode="json")))
    C.write_manifest(ck, {**C.read_manifest(ck), "files": None})  # re-hash after editing config.json

    ok = plan_resume(ck, old.model_copy(update={"training": old.training.model_copy(update={"max_train_epochs": 8})}))
    assert ok.ok and ok.changed == [("training.max_train_epochs", 4, 8)]

    bad = resolve({**old.model_dump(mode="json"), "network": {"rank": 32}, "training": {"train_batch_size": 2}})
    plan = plan_resume(ck, bad)
    assert not plan.ok and len(plan.refused) == 2
    assert plan.refused[0].startswith("network.rank cannot change on resume (16 -> 32)")
    assert plan.refused[1].startswith("training.train_batch_size: the global batch would change from 1 "
                                      "(1 process x batch 1) to 2 (1 process x batch 2)")

    # Another layout of the same global batch resumes (elastic), and the preflight says so.
    wide = resolve({**old.model_dump(mode="json"), "training": {"train_batch_size": 2, "max_train_epochs": 4},
                    "launch": {"num_processes": 2, "device": "cpu"}})
    narrow = make_ckpt(tmp_path, "step-00000003", {"run_name": "lora", "step": 3, "epoch": 0, "steps_per_epoch": 4,
                                                   "world_size": 2})
    (narrow / "config.json").write_text(json.dumps(wide.model_dump(mode="json")))
    C.write_manifest(narrow, {**C.read_manifest(narrow), "files": None})
    one = resolve({**wide.model_dump(mode="json"), "training": {"train_batch_size": 4, "max_train_epochs": 4},
                   "launch": {"num_processes": 1, "device": "cpu"}})
    elastic = plan_resume(narrow, one, check_dataset=False)
    assert elastic.ok, elastic.refused
    assert "  layout: 2 processes x batch 2 -> 1 process x batch 4 (global batch 4 kept" in "\n".join(elastic.describe())

    done = resolve({**old.model_dump(mode="json"), "training": {"max_train_epochs": 2}})
    assert "training is already complete at this checkpoint (step 8 of 8" in plan_resume(ck, done).refused[0]

    (data_dir / "y.png").write_bytes(b"new image")
    assert "changed since this checkpoint was saved" in plan_resume(ck, old).refused[0]

    (ck / "manifest.json").unlink()
    assert "is incomplete" in plan_resume(ck, old).refused[0]


def test_positions_of_old_checkpoints_are_converted_to_global_batches():
    from backend.trainer.state import PLAN_FORMAT, batches_done, saved_layout

    assert batches_done({"batch_in_epoch": 6, "plan_format": PLAN_FORMAT}, 2) == 6
    assert batches_done({"batch_in_epoch": 6}, 2) == 3  # format 1 counted micro-batches
    assert batches_done({"batch_in_epoch": 5, "gradient_accumulation_steps": 2}, 4) == 3  # a short last step
    assert saved_layout({"world_size": 2, "train_batch_size": 2, "gradient_accumulation_steps": 1}) == (2, 2, 1)
    assert saved_layout({"world_size": 1}) is None  # older checkpoints: the layout is not checked


def test_files_are_hashed_while_written_and_verified_from_the_bytes_read(tmp_path, monkeypatch):
    import hashlib

    import xxhash

    atomic = C.AtomicDir(tmp_path / "checkpoints", "step-00000001")
    with atomic as tmp:
        C.write_file(tmp / "a.bin", b"x" * 5000)
        (tmp / "b.json").write_text("{}")  # written another way: hashed by reading it back
        C.write_file(tmp / "c.bin", b"old")
        (tmp / "c.bin").write_bytes(b"changed after write_file")  # the recorded hash no longer applies
        read_back = []
        real = C.file_digests
        monkeypatch.setattr(C, "file_digests", lambda p: read_back.append(p.name) or real(p))
        manifest = atomic.commit({"run_name": "x"})
    assert sorted(read_back) == ["b.json", "c.bin"]  # a.bin was not read a second time
    for name, content in (("a.bin", b"x" * 5000), ("c.bin", b"changed after write_file"), ("b.json", b"{}")):
        assert manifest["files"][name] == {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest(),
                                           "xxh3_128": xxhash.xxh3_128(content).hexdigest()}
    folder = atomic.final
    reader = C.VerifiedReader(folder, C.read_manifest(folder))
    assert reader.read("a.bin") == b"x" * 5000
    reader.finish()  # b.json and c.bin verified too
    data = bytearray((folder / "a.bin").read_bytes())
    data[100] ^= 1
    (folder / "a.bin").write_bytes(bytes(data))
    with pytest.raises(C.CorruptFile, match=r"a.bin: xxh3_128 hash differs"):
        C.VerifiedReader(folder, C.read_manifest(folder)).read("a.bin")
    (folder / "a.bin").write_bytes(b"x" * 5000)
    (folder / "b.json").unlink()
    with pytest.raises(C.CorruptFile, match="b.json: missing"):
        C.VerifiedReader(folder, C.read_manifest(folder)).finish()


def test_state_tensor_files_are_standard_safetensors_both_ways(tmp_path):
    """tensorfile writes files safetensors' own loader reads, and reads files safetensors wrote."""
    import torch
    from safetensors.torch import load_file, save_file

    from backend.trainer import tensorfile

    tensors = {"a.f16": torch.randn(3, dtype=torch.float16), "b.f32": torch.randn(2, 5), "c.step": torch.tensor(7.0),
               "d.bf16": torch.randn(4, 1, dtype=torch.bfloat16), "e.i64": torch.arange(3), "f.empty": torch.zeros(0, 2),
               "g.bool": torch.tensor([True, False, True])}
    C.write_file(tmp_path / "ours.safetensors", tensorfile.buffers(tensors, {"k": "v"}))
    theirs = load_file(str(tmp_path / "ours.safetensors"))
    save_file(tensors, str(tmp_path / "theirs.safetensors"))
    ours = tensorfile.load((tmp_path / "theirs.safetensors").read_bytes())
    for got in (theirs, ours):
        assert got.keys() == tensors.keys()
        assert all(got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v) for k, v in tensors.items())
    data, sha = C.read_hashed(tmp_path / "ours.safetensors")
    assert bytes(data) == (tmp_path / "ours.safetensors").read_bytes() and sha == C.sha256_file(tmp_path / "ours.safetensors")
    with pytest.raises(ValueError):
        tensorfile.load(bytes(data[:20]))
    C._WRITTEN.clear()


@pytest.mark.parametrize("older", ["sha256 only", "sha256 and blake3"])
def test_entries_without_xxh3_are_verified_by_their_sha256(tmp_path, older):
    """Checkpoints written before XXH3-128 was recorded list sha256 only, or sha256 and BLAKE3
    (2026-12-03): reads and verify check the sha256."""
    ck = make_ckpt(tmp_path, "epoch-000001")
    manifest = C.read_manifest(ck)
    for meta in manifest["files"].values():
        del meta["xxh3_128"]
        if older == "sha256 and blake3":
            meta["blake3"] = "0" * 64  # not checked: a wrong one changes nothing
    (ck / C.MANIFEST).write_text(json.dumps(manifest))
    assert C.checkpoint_status(ck) == ("valid", [])
    assert C.VerifiedReader(ck, manifest).read("a.bin") == b"\x00" * 100
    (ck / "a.bin").write_bytes(b"\x00" * 99 + b"\x01")
    assert C.checkpoint_status(ck) == ("corrupt", ["a.bin: sha256 hash differs from the manifest (file changed or corrupt)"])
    with pytest.raises(C.CorruptFile, match="a.bin: sha256 hash differs"):
        C.VerifiedReader(ck, manifest).read("a.bin")
