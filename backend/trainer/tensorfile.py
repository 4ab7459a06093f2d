"""The safetensors format, written from the tensors' own memory and read without a copy.

`safetensors.torch.save` builds the whole file as one Python bytes object (a copy of every tensor)
and one big `write()` of it is slow on some kernels; `save_file` cannot be hashed while written.
So checkpoints and exports write the format themselves (it is small: an 8-byte little-endian header
length, a JSON header of dtype, shape and byte offsets per tensor, padded with spaces to a multiple
of 8, then the tensors' bytes back to back, https://github.com/huggingface/safetensors#format) as a
list of buffers that `hashed_io.write_file` / `write_durable` write in chunks (hashing them for a
checkpoint's manifest), and read it back from a verified buffer with `torch.frombuffer` views. The
files are ordinary safetensors files: any safetensors reader opens them (tested against
safetensors' own loader and writer).
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
BY_NAME = {v: k for k, v in DTYPES.items()}


def _bytes_of(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def layout(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], list[memoryview]]:
    """(the header's tensor entries, each tensor's bytes as a view of its memory, no copy), in file
    order: wider dtypes first, then by name, as safetensors orders them (for one dtype: by name)."""
    entries: dict[str, Any] = {}
    parts: list[memoryview] = []
    offset = 0
    for name in sorted(tensors, key=lambda k: (-tensors[k].element_size(), k)):  # wider first: aligned offsets
        t = tensors[name]
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be saved")
        data = _bytes_of(t)
        entries[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        parts.append(data)
        offset += len(data)
    return entries, parts


def header(entries: dict[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """The file's first bytes: the length, then the JSON header padded with spaces to a multiple of 8.
    Non-ASCII stays UTF-8 (not escaped), as safetensors writes it, so the lengths agree."""
    head = json.dumps({"__metadata__": metadata, **entries} if metadata is not None else entries, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head


def buffers(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> list[memoryview | bytes]:
    """The file as buffers: the header, then each tensor's bytes (views of its memory, no copy)."""
    entries, parts = layout(tensors)
    return [header(entries, metadata), *parts]


def window(pieces: list[memoryview | bytes], start: int, length: int) -> bytes:
    """Bytes [start, start + length) of the file that `pieces` make back to back (fewer at its end)."""
    out, pos = bytearray(), 0
    for piece in pieces:
        view = memoryview(piece).cast("B")
        lo, hi = max(start, pos), min(start + length, pos + len(view))
        if lo < hi:
            out += view[lo - pos : hi - pos]
        pos += len(view)
        if pos >= start + length:
            break
    return bytes(out)


def load(buf: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in `buf`, as views of it (no copy; the buffer stays
    alive as long as a tensor does). Bounds are checked: a damaged header is a ValueError."""
    if isinstance(buf, bytes):
        buf = bytearray(buf)  # torch tensors over a read-only buffer would be writable anyway
    view = memoryview(buf)
    if len(view) < 8:
        raise ValueError("not a safetensors file (shorter than its header length)")
    (n,) = struct.unpack("<Q", view[:8])
    if n > len(view) - 8:
        raise ValueError("not a safetensors file (header longer than the file)")
    header = json.loads(bytes(view[8 : 8 + n]))
    start = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= len(view) - start:
            raise ValueError(f"{name}: data outside the file")
        dtype = BY_NAME[info["dtype"]]
        count = (end - begin) // torch.empty(0, dtype=dtype).element_size()
        flat = torch.frombuffer(view, dtype=dtype, count=count, offset=start + begin) if count else torch.empty(0, dtype=dtype)
        out[name] = flat.reshape(info["shape"])
    return out
