"""The combination campaign, short: a few combinations of settings trained for real, each resumed
from a step checkpoint in the middle of an epoch, then checked (losses and final LoRA bit-identical
to the straight run, `verify` passes for every checkpoint, ranks identical with 2 processes, family
and v-prediction right). The long version is bench/combos.py (`--n 50`); both run
tests/combo_helpers.py.

These stress the known weak spots and train DoRA, LoKr and LoHa; the pairwise list itself runs in
bench/combos.py (its generator is unit-tested in test_combo_helpers.py). Uncached latents with
dropout and a resume in the middle of an epoch (with the text encoder trained, as a LoCon):
test_correctness_e2e.py's off-default run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import combo_helpers as H

pytestmark = pytest.mark.train

CASES = [
    # Text-encoder DoRA (its magnitudes on the convolutions too), with network, rank and module
    # dropout, under DDP: every rank must end with the same tensors although each rank skips other
    # modules; captions encoded in two 75-token chunks by the trained encoder.
    ("te-dropout-ddp-dora", H.baseline(network__type="dora", network__conv_rank=2, network__train_text_encoder=True,
                                       network__dropout=0.1, network__rank_dropout=0.1, network__module_dropout=0.2,
                                       training__max_token_length=150, launch__num_processes=2)),
    # SD2-768-v: detected as sd2, trained with v-prediction because its scheduler says so; Min-SNR's
    # v weighting; a LoKr network; D-Adaptation Lion's step-size estimate resumed; the base UNet in fp8;
    # two CPU threads (the demo's own choice is one).
    ("sd2v-vpred-lokr", H.baseline(model="sd2v", training__min_snr_gamma=5.0, network__type="lokr",
                                   optimizer__type="DAdaptLion", model__fp8_base=True,
                                   launch__num_cpu_threads_per_process=2)),
    # SD3.5-shaped (MMDiT, CLIP-L + CLIP-G + T5, flow matching) under DDP: a timestep range, LoRA+.
    ("sd3-ddp-flow", H.baseline(model="sd3", launch__num_processes=2, training__min_timestep=100,
                                optimizer__loraplus_lr_ratio=16.0)),
    # Flux.1-dev-shaped (double/single-stream transformer, CLIP-L + T5, guidance embedding) under DDP,
    # CLIP-L trained too (T5 frozen: its outputs computed once per caption, shared over the ranks), the
    # transformer's base in fp8: shifted sigmoid timesteps, the output read sigma-scaled with the
    # sigma_sqrt loss weighting, the export fused into sd-scripts' qkv/linear1 layers plus lora_te1_.
    ("flux-ddp-shift", H.baseline(model="flux", launch__num_processes=2, training__timestep_sampling="shift",
                                  network__train_text_encoder=True, model__fp8_base=True,
                                  training__model_prediction_type="sigma_scaled", training__weighting_scheme="sigma_sqrt")),
    # SDXL's two text encoders trained, captions re-encoded every step (shuffled); LoHa with its
    # convolution layers (LDM names in the export), module dropout; D-Adaptation Adam; 150-token
    # captions (both encoders chunked, the pooled output from the first chunk).
    ("sdxl-te-loha", H.baseline(model="sdxl", network__train_text_encoder=True, captions="shuffle", network__type="loha",
                                network__conv_rank=2, network__module_dropout=0.2, training__max_token_length=150,
                                optimizer__type="DAdaptAdam")),
]


@pytest.mark.parametrize("label, combo", CASES, ids=[label for label, _ in CASES])
def test_combination_resumes_exactly_and_verifies(demo: Path, tmp_path: Path, label: str, combo: H.Combo):
    result = H.run_combination(combo, demo, tmp_path, label=label)
    assert result.passed, result.summary()
