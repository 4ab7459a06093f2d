"""Captions and prompts longer than 75 tokens (training.max_token_length 150/225), encoded in chunks
of 75 as sd-scripts does: the token chunks against sd-scripts' own loop (library/strategy_base.py,
TokenizeStrategy._get_input_ids, transcribed below), the joined encoder states against its
encode_tokens (library/strategy_sd.py, strategy_sdxl.py), and what a user sees: text past token 75
changes the conditioning only when the longer length is set."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from backend.config import TrainingConfig
from backend.trainer.models import chunk_ids, encode_tokens, load_components, merge_chunks, tokenize

LONG = "a photo of a red circle on a blue square " * 12
CAPTIONS = ["", "a dog", "a cat " * 20, LONG]


@cache
def components(model: str):
    return load_components(TrainingConfig.model_validate({"model": {"pretrained_model": f"demo/{model}"}}))


def sd_scripts_ids(tokenizer, text: str, max_length: int) -> torch.Tensor:
    """sd-scripts' _get_input_ids for one caption (max_length = max_token_length + 2), unweighted."""
    input_ids = tokenizer(text, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt").input_ids
    input_ids = input_ids.squeeze(0)
    iids_list = []
    m = tokenizer.model_max_length
    for i in range(1, max_length - m + 2, m - 2):
        ids_chunk = torch.cat((input_ids[0].unsqueeze(0), input_ids[i : i + m - 2], input_ids[-1].unsqueeze(0)))
        if tokenizer.pad_token_id != tokenizer.eos_token_id:  # v2 or SDXL
            if ids_chunk[-2] != tokenizer.eos_token_id and ids_chunk[-2] != tokenizer.pad_token_id:
                ids_chunk[-1] = tokenizer.eos_token_id
            if ids_chunk[1] == tokenizer.pad_token_id:
                ids_chunk[1] = tokenizer.eos_token_id
        iids_list.append(ids_chunk)
    return torch.stack(iids_list)


@pytest.mark.parametrize("model", ["model", "model-sd2v", "model-sdxl"])
@pytest.mark.parametrize("length", [150, 225])
def test_token_chunks_are_sd_scripts(model: str, length: int):
    comps = components(model)
    ids = tokenize(comps, CAPTIONS, length)
    assert len(ids) == len(comps.tokenizers)
    for tok, got in zip(comps.tokenizers, ids, strict=True):
        assert got.shape == (len(CAPTIONS), length // 75, 77)
        for j, caption in enumerate(CAPTIONS):
            assert torch.equal(got[j], sd_scripts_ids(tok, caption, length + 2)), (model, caption)
    # SD2's pad token is not <EOS>: an empty chunk starts <BOS> <EOS>, a chunk cut inside the text ends in <EOS>
    if model == "model-sd2v":
        tok = comps.tokenizers[0]
        assert ids[0][1, 1, :2].tolist() == [tok.bos_token_id, tok.eos_token_id]
        assert ids[0][3, 0, -1] == tok.eos_token_id and ids[0][3, 0, -2] not in (tok.eos_token_id, tok.pad_token_id)


def test_75_tokens_is_clip_unchanged():
    comps = components("model")
    assert tokenize(comps, CAPTIONS, 75)[0].shape == (len(CAPTIONS), 77)
    ids = chunk_ids(comps.tokenizers[0](CAPTIONS, padding="max_length", max_length=77, truncation=True,
                                        return_tensors="pt").input_ids, comps.tokenizers[0])
    assert ids.shape == (len(CAPTIONS), 1, 77)


@pytest.mark.parametrize("n", [2, 3])
def test_joined_states_are_the_first_bos_the_inner_75_of_each_chunk_and_the_last(n: int):
    """sd-scripts: states_list = [h[:, 0]] + [h[:, i : i + 75] for i in range(1, n * 77, 77)] + [h[:, -1]]."""
    b, width = 2, 3
    hidden = torch.arange(b * n * 77 * width, dtype=torch.float32).reshape(b * n, 77, width)
    joined = merge_chunks(hidden, n)
    flat = hidden.reshape(b, n * 77, width)
    want = torch.cat([flat[:, :1]] + [flat[:, i : i + 75] for i in range(1, n * 77, 77)] + [flat[:, -1:]], dim=1)
    assert joined.shape == (b, n * 75 + 2, width) and torch.equal(joined, want)
    assert merge_chunks(hidden, 1) is hidden


@pytest.mark.parametrize("model", ["model", "model-sd2v", "model-sdxl"])
def test_text_past_token_75_conditions_only_with_the_longer_length(model: str):
    comps = components(model)
    tok = comps.tokenizers[0]
    head = ""
    while len(tok(head).input_ids) < 2 + 90:  # 90 tokens: past the first chunk, inside the second
        head += "a cat "
    a, b = head + "red circle", head + "blue square"

    def encode(captions: list[str], length: int, clip_skip: int = 1):
        with torch.no_grad():
            return encode_tokens(comps, tokenize(comps, captions, length), clip_skip)

    (ctx75, _), (ctx150, pooled150) = encode([a, b], 75), encode([a, b], 150)
    assert ctx75.shape[1] == 77 and ctx150.shape[1] == 152
    assert torch.equal(ctx75[0], ctx75[1])  # cut at 75 tokens: the two captions are the same
    assert not torch.allclose(ctx150[0], ctx150[1])  # in the second chunk they differ
    # A short caption: the first chunk is CLIP's own encoding; the pooled output (SDXL) is the first chunk's.
    (short75, p75), (short225, p225) = encode(["a dog"], 75, 2), encode(["a dog"], 225, 2)
    assert short225.shape[1] == 227 and torch.allclose(short225[:, :76], short75[:, :76], atol=1e-5)
    if comps.is_sdxl:
        assert pooled150.shape == (2, comps.text_encoders[1].config.projection_dim)
        assert torch.allclose(p225, p75, atol=1e-5)
