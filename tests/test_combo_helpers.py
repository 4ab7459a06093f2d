"""The combination campaign's pure parts (no training): the pairwise covering generator, the
factor space and its constraints, and the config each combination becomes."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from backend.presets import resolve
from tests import combo_helpers as H
from tests import pairwise as P

SMALL: P.Space = {"a": [0, 1, 2], "b": ["x", "y"], "c": [True, False], "d": [None, 1.5, 3.0], "e": ["p", "q"]}


def no_a2_with_x(c: P.Combo) -> bool:
    return not (c.get("a") == 2 and c.get("b") == "x")


def all_pairs_of(space: P.Space, combos: list[P.Combo]) -> set[tuple]:
    return {(f, c[f], g, c[g]) for c in combos for f, g in itertools.combinations(space, 2)}


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_every_pair_of_levels_is_covered(seed):
    rows = P.pairwise(SMALL, seed)
    wanted = {(f, x, g, y) for f, g in itertools.combinations(SMALL, 2) for x in SMALL[f] for y in SMALL[g]}
    assert all_pairs_of(SMALL, rows) >= wanted
    assert len(rows) < len(list(itertools.product(*SMALL.values())))  # 72 in all
    assert all(set(r) == set(SMALL) and all(r[k] in SMALL[k] for k in r) for r in rows)


def test_constraints_are_respected_and_impossible_pairs_not_required():
    rows = P.pairwise(SMALL, 3, no_a2_with_x)
    assert rows and all(no_a2_with_x(r) for r in rows)
    got = all_pairs_of(SMALL, rows)
    assert ("a", 2, "b", "x") not in got
    wanted = {(f, x, g, y) for f, g in itertools.combinations(SMALL, 2) for x in SMALL[f] for y in SMALL[g]
              if no_a2_with_x({f: x, g: y})}
    assert got >= wanted


def test_deterministic_for_a_seed_and_seeds_differ():
    assert P.pairwise(SMALL, 5) == P.pairwise(SMALL, 5)
    assert H.combinations(40, seed=2) == H.combinations(40, seed=2)
    assert P.pairwise(H.SPACE, 0, H.valid) != P.pairwise(H.SPACE, 1, H.valid)


def test_contradicting_constraints_are_reported():
    with pytest.raises(ValueError, match="no valid combination"):
        # a=0 with b=0 passes as a pair, but no level of c completes it
        P.pairwise({"a": [0, 1], "b": [0, 1], "c": [0, 1]}, 0, lambda c: not (c.get("a") == c.get("b") == 0 and "c" in c))


def test_the_campaign_space_is_covered_within_its_constraints():
    rows = P.pairwise(H.SPACE, 0, H.valid)
    assert P.covered_pairs(H.SPACE, rows) >= set(P.required_pairs(H.SPACE, H.valid))
    assert all(H.valid(r) for r in rows)
    assert not any(r["scheduler.type"] == "constant" and r["scheduler.warmup_steps"] > 0 for r in rows)
    assert 42 <= len(rows) <= 85  # at least 6 schedulers x 7 optimizers
    assert {o for r in rows for o in [r["optimizer.type"]]} == {"AdamW", "Prodigy", "DAdaptAdam", "DAdaptLion", "Lion",
                                                                "Adafactor", "SGD"}


def test_more_combinations_than_the_covering_set_are_distinct_random_valid_ones():
    cover = P.pairwise(H.SPACE, 4, H.valid)
    combos = H.combinations(len(cover) + 10, seed=4)
    labels = [label for label, _ in combos]
    assert labels[: len(cover)] == [f"pairwise-{i:03d}" for i in range(len(cover))]
    assert labels[len(cover):] == [f"random-{i:03d}" for i in range(10)]
    extra = [c for _, c in combos[len(cover):]]
    assert all(H.valid(c) and c not in cover for c in extra)
    assert all(a != b for a, b in itertools.combinations(extra, 2))


def test_baseline_rejects_unknown_levels():
    assert H.baseline(network__dropout=0.1)["network.dropout"] == 0.1
    assert H.describe(H.baseline()) == "demo preset"
    with pytest.raises(KeyError):
        H.baseline(network__dropout=0.5)


@pytest.mark.parametrize("label, combo", H.combinations(8, seed=0) + [
    ("ddp-ga2-b4", H.baseline(launch__num_processes=2, training__gradient_accumulation_steps=2)),
    ("b1-val", H.baseline(training__train_batch_size=1, dataset__validation_split=0.25))])
def test_each_config_validates_with_a_mid_epoch_step_save(demo: Path, tmp_path, label, combo):
    data = H.config_for(combo, demo, tmp_path / "runs")
    cfg = resolve(data)  # a valid config
    assert (cfg.launch.device, cfg.sampling.prompts, cfg.model.family) == ("cpu", [], "auto")
    assert cfg.model.pretrained_model == str(demo / H.MODELS[combo["model"]])
    spe, k = H.steps_per_epoch(cfg), cfg.saving.save_every_n_steps
    assert k % spe != 0, (spe, k)  # the resume point is inside an epoch
    assert cfg.training.max_train_steps == k + H.STEPS_AFTER_RESUME and cfg.saving.save_every_n_epochs is None
    for name, level in combo.items():
        if name.count(".") == 1 and name != "optimizer.type":
            sec, key = name.split(".")
            assert getattr(getattr(cfg, sec), key, H.SPACE[name][0]) == level, name  # not a field of this type: its default level
    assert cfg.optimizer.type == combo["optimizer.type"] and cfg.scheduler.type == combo["scheduler.type"]
    assert cfg.network.rank == 4


def test_the_demo_epoch_has_16_batches_of_4(demo: Path, tmp_path):
    """The demo set: 12 images x 5 repeats + 2 x 2 = 64 image uses, 3 buckets; the docs rely on 16."""
    cfg = resolve(H.config_for(H.baseline(), demo, tmp_path))
    assert H.steps_per_epoch(cfg) == 16 and cfg.saving.save_every_n_steps == 4
