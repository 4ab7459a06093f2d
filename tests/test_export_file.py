"""The exported network file is written straight from the tensors' memory: an ordinary safetensors
file (safetensors' own reader gets the tensors and metadata back), fsynced, and with the
additional-networks hashes sd-scripts computes over safetensors' own serialization."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from backend.trainer import export, tensorfile


def tensors_over_a_mebibyte() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in (3, 1, 2, 0):  # not in name order
        stem = f"lora_unet_block_{i}_attn"
        out[f"{stem}.lora_down.weight"] = torch.randn(64, 640 * (i + 1), generator=g).half()
        out[f"{stem}.lora_up.weight"] = torch.randn(640 * (i + 1), 64, generator=g).half()
        out[f"{stem}.alpha"] = torch.tensor(8.0).half()
    out["lora_unet_block_0_attn.lora_up.weight"] = torch.randn(64, 640, generator=g).half().T  # not contiguous
    return out


def sd_scripts_hashes(path) -> tuple[str, str]:
    """sd-scripts' precalculate_safetensors_hashes, from the file: its tensors serialized by
    safetensors with only the ss_* metadata."""
    meta = safe_open(str(path), "pt").metadata()
    data = save(load_file(path), {k: v for k, v in meta.items() if k.startswith("ss_")})
    header = 8 + int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[header:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_the_export_reads_back_in_safetensors_with_sd_scripts_hashes(tmp_path):
    tensors = tensors_over_a_mebibyte()
    assert sum(t.numel() * t.element_size() for t in tensors.values()) > 0x110000  # the legacy window is tensor data
    meta = {"ss_output_name": "café \"quoted\"\nline", "ss_network_dim": 16, "ss_tag_frequency": {"set": {"ü": 2}},
            "modelspec.title": "ünïcode", "skipped": None}
    path = tmp_path / "out.safetensors"
    export.save_export(str(path), tensors, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # renamed into place, no .tmp left

    back = load_file(path)
    assert set(back) == set(tensors) and all(torch.equal(back[k], t) for k, t in tensors.items())
    got = safe_open(str(path), "pt").metadata()
    assert got["ss_output_name"] == meta["ss_output_name"] and got["modelspec.title"] == "ünïcode"
    assert json.loads(got["ss_tag_frequency"]) == {"set": {"ü": 2}} and got["ss_network_dim"] == "16"
    assert "skipped" not in got
    assert (got["sshs_model_hash"], got["sshs_legacy_hash"]) == sd_scripts_hashes(path)
    raw = path.read_bytes()
    assert got["sshs_model_hash"] == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()
    # safetensors' own file of the same tensors and metadata: the same length of header, the same tensor bytes
    theirs = save({k: t.contiguous() for k, t in tensors.items()}, got)
    head = 8 + int.from_bytes(raw[:8], "little")
    assert int.from_bytes(theirs[:8], "little") == head - 8 and theirs[head:] == raw[head:]


def test_a_small_export_and_one_without_metadata_hash_as_sd_scripts(tmp_path):
    small = {"lora_te_x.lora_down.weight": torch.ones(4, 8), "lora_te_x.alpha": torch.tensor(4.0)}
    for meta in ({"ss_network_dim": "4"}, {}):
        path = tmp_path / f"small{len(meta)}.safetensors"
        export.save_export(str(path), small, meta)
        got = safe_open(str(path), "pt").metadata()
        assert (got["sshs_model_hash"], got["sshs_legacy_hash"]) == sd_scripts_hashes(path)
        assert got["sshs_legacy_hash"] == hashlib.sha256(b"").hexdigest()[:8]  # the file ends before 1 MiB


def test_window_reads_across_the_pieces_of_a_file():
    pieces = [b"abc", memoryview(bytearray(b"defg")), b"", b"hij"]
    whole = b"abcdefghij"
    for start in range(12):
        for length in range(12):
            assert tensorfile.window(pieces, start, length) == whole[start : start + length]
