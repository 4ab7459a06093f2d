"""The CLIP tokenizer, built offline from the BPE merges shipped with Lathe.

SD1.x, SD2.x and SDXL all use OpenAI CLIP's byte-level BPE (49,408 tokens). Hugging Face repos ship
it as vocab.json + merges.txt, which cannot be downloaded here, so Lathe ships one copy of the
original merges list (model_configs/clip_bpe_vocab.txt.gz: the first 48,894 merges of OpenAI's
bpe_simple_vocab_16e6.txt.gz, taken unchanged from the open_clip_torch 3.3.0 wheel, MIT licence)
and derives the vocabulary exactly as openai/CLIP's SimpleTokenizer does. The ids are those of
openai/clip-vit-large-patch14's tokenizer: "a photo of a cat" -> 49406 320 1125 539 320 2368 49407.

Only the pad token differs between families: "<|endoftext|>" for SD1.x and SDXL's first tokenizer,
"!" (OpenCLIP's padding, id 0) for SD2.x and SDXL's tokenizer_2.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Any

from transformers import CLIPTokenizer

BPE_VOCAB_PATH = Path(__file__).parent / "model_configs" / "clip_bpe_vocab.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # what SimpleTokenizer keeps: 48,894 merges
CLIP_VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible table from the 256 byte values to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


@functools.lru_cache(maxsize=2)
def _read_bpe(path: Path) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = tuple((a, b) for a, b in (line.split() for line in lines[1 : NUM_MERGES + 1]))
    if len(merges) != NUM_MERGES:
        raise ValueError(f"{path} holds {len(merges)} BPE merges, expected {NUM_MERGES}")
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return tuple(tokens), merges


def clip_vocab_and_merges(path: Path = BPE_VOCAB_PATH) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocab (token -> id, 49,408 entries) and merges, as in vocab.json / merges.txt."""
    tokens, merges = _read_bpe(path)
    return {t: i for i, t in enumerate(tokens)}, list(merges)


def build_clip_tokenizer(pad_token: str = EOS_TOKEN, model_max_length: int = 77) -> CLIPTokenizer:
    """The standard CLIP tokenizer (SD1.x/SD2.x/SDXL), built without touching the network."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=model_max_length)


def _token_text(value: Any, default: str) -> str:
    """tokenizer_config.json writes special tokens either as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return str(value.get("content", default))
    return default if value is None else str(value)


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    """A tokenizer folder: its own vocabulary when it has one (tokenizer.json or vocab.json +
    merges.txt), otherwise the shipped CLIP vocabulary with the folder's tokenizer_config.json
    settings (pad token, model_max_length)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    return build_clip_tokenizer(
        pad_token=_token_text(cfg.get("pad_token"), EOS_TOKEN),
        model_max_length=int(cfg.get("model_max_length") or 77),
    )
