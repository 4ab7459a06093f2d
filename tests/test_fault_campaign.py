"""The fault-injection campaign, short: a few SIGKILLs at random moments (biased toward save windows)
and each scenario once (GUI killed mid-run, disk full during a save, corrupt checkpoints, dataset
unplugged with and without cached latents). The long version is bench/fault_campaign.py
(`--kills 100`); both run the same code (tests/fault_helpers.py, bench/fault_campaign.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import fault_campaign as B
from tests import fault_helpers as F
from tests.gui_helpers import chromium_or_skip

pytestmark = pytest.mark.train

KILLS = 5
SEED = 2  # its first five kills: one at start-up, three in save windows, one uniform; both kill kinds


@pytest.fixture(scope="module")
def reference(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[int, float], Path]:
    """The uninterrupted run with the campaign's config: every resumed loss is compared with it."""
    return F.reference_run(demo, tmp_path_factory.mktemp("fault-reference"))


def test_sigkill_at_random_moments_loses_nothing_and_resumes_bit_exact(demo, reference, tmp_path):
    c = F.Campaign(demo, tmp_path, *reference, seed=SEED, deep_every=2, cli_every=3, log=lambda line: None)
    records = F.run_kills(c, KILLS)
    summary = B.summarize(records, c.segments, [])
    assert summary["kills"] == KILLS
    for r in records:
        assert r.state in ("failed", "stopped") and r.reason, r.to_json()  # never left "running"
        assert r.problems == [], r.to_json()  # no lying listing, verify --quick passes, exports load
        assert r.lost == [], r.to_json()
        assert r.bitexact is not False, r.bitexact_note
    assert summary["checkpoints_lost"] == 0
    assert {"save", "startup"} <= {r.mode for r in records} and {"tree", "group"} == {r.how for r in records}
    assert any(r.cli for r in records) and all(r.cli.get("verify_latest_rc", 0) == 0 for r in records)
    assert summary["resumes_checked"] >= 1, c.segments
    assert summary["resumes_bitexact"] == summary["resumes_checked"], c.segments


@pytest.mark.browser
def test_killing_the_gui_mid_run_leaves_the_run_going_and_a_new_gui_sees_it_finish(demo, tmp_path):
    chromium_or_skip()
    result = B.gui_killed(demo, tmp_path, epochs=4)
    assert result["ok"], result
    facts = result["facts"]
    assert facts["step_after_gui_kill"] > facts["gui_killed_at_step"]
    assert facts["new_gui_shows"] == ["finished", 64] and facts["final_state"] == "finished"


def test_disk_full_during_a_save_fails_the_run_and_keeps_earlier_checkpoints(demo, reference, tmp_path):
    result = B.disk_full(demo, tmp_path, *reference, target="optimizer.safetensors", at=12, resume=False)  # bench resumes too
    assert result["ok"], result
    facts = result["facts"]
    assert facts["state"] == "failed" and facts["reason"].startswith("disk full while writing optimizer.safetensors")
    assert facts["checkpoints"] == {"step-00000004": "valid", "step-00000008": "valid"}


def test_flipped_byte_and_deleted_file_are_reported_corrupt_and_never_latest(reference, tmp_path):
    result = B.corrupted(tmp_path, reference[1])
    assert result["ok"], result
    facts = result["facts"]
    assert all(facts["listing"][name] == "corrupt" for name in facts["corrupted"])
    assert facts["latest"] not in facts["corrupted"]


@pytest.mark.parametrize("cache", [False, True], ids=["images-read-while-training", "cached-latents"])
def test_unplugging_the_dataset_mid_run_never_hangs_or_damages_checkpoints(demo, tmp_path, cache):
    result = B.unplugged(demo, tmp_path, cache=cache)
    assert result["ok"], result
    facts = result["facts"]
    if cache:
        assert facts["state"] == "finished" and facts["step"] == 48
    else:
        assert facts["state"] == "failed" and "No such file or directory" in facts["reason"]
