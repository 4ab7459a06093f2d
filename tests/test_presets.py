"""Presets: the shipped library, sparse saving, round trips, unknown keys, migrations, names, secrets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from backend import presets
from backend.config import SCHEMA_VERSION, ConfigError, TrainingConfig, config_warnings
from backend.presets import (
    PresetExistsError,
    delete_preset,
    find_preset,
    list_presets,
    load_config_or_preset,
    load_preset,
    migrate,
    read_preset,
    resolve,
    sanitize_preset_name,
    save_preset,
    sparse_overrides,
    strip_secrets,
    user_presets_dir,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "presets").glob("*.json"))
FIXTURES = ROOT / "tests" / "fixtures" / "presets"
FROZEN = sorted(FIXTURES.glob("v*/*.json"))


def errors(data: dict, sets: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        resolve(data, sets)
    return e.value.lines


def saved(tmp_path: Path, cfg: TrainingConfig, name: str = "mine") -> dict:
    path = save_preset(cfg, name, user_dir=tmp_path).path
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------ library
def test_the_library_is_there():
    names = {p.stem for p in SHIPPED}
    assert {"sd15-character-prodigy", "sd15-style-adamw-cosine", "sdxl-lora-12gb", "sdxl-lora-16gb",
            "sdxl-lora-24gb", "sdxl-prodigy"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_preset_loads_and_validates(path: Path):
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == SCHEMA_VERSION
    assert raw["name"] == path.stem
    assert len(raw["description"]) > 40
    preset = read_preset(path, "shipped")
    assert preset.name == path.stem and preset.file_version == SCHEMA_VERSION
    assert config_warnings(preset.config) == []
    # Only real settings: every key of the file is a setting path (no silently ignored typo).
    assert presets.unknown_key_lines(raw) == []


@pytest.mark.parametrize("path", [p for p in SHIPPED if not p.stem.startswith("demo")], ids=lambda p: p.stem)
def test_library_descriptions_say_who_it_is_for_and_paths_are_placeholders(path: Path):
    preset = read_preset(path)
    assert "For people" in preset.description
    assert preset.config.model.pretrained_model.startswith("models/")
    assert preset.config.dataset.train_data_dir.startswith("datasets/")


def test_library_values():
    char = load_preset("sd15-character-prodigy").config
    opt = char.optimizer
    assert opt.type == "Prodigy"
    assert (opt.d_coef, opt.learning_rate, opt.weight_decay) == (1.0, 1.0, 0.01)
    assert opt.use_bias_correction and opt.safeguard_warmup
    assert char.model.family == "sd15"

    style = load_preset("sd15-style-adamw-cosine").config
    assert (style.optimizer.type, style.scheduler.type, style.model.family) == ("AdamW", "cosine", "sd15")

    sdxl = {gb: load_preset(f"sdxl-lora-{gb}gb").config for gb in (12, 16, 24)}
    for cfg in sdxl.values():
        assert cfg.model.family == "sdxl" and cfg.dataset.resolution == 1024
        assert cfg.training.gradient_checkpointing and cfg.dataset.cache_latents
        assert cfg.training.mixed_precision == "bf16"
    # More memory buys a bigger batch and, at 24 GB, the text encoders.
    assert [sdxl[g].training.train_batch_size for g in (12, 16, 24)] == [1, 2, 4]
    assert [sdxl[g].network.train_text_encoder for g in (12, 16, 24)] == [False, False, True]

    flux = {gb: load_preset(f"flux1-dev-lora-{gb}gb").config for gb in (12, 16, 24)}
    for cfg in flux.values():
        m = cfg.model
        assert m.family == "flux" and m.fp8_base and cfg.dataset.resolution == 1024
        assert (m.pretrained_model, m.clip_l, m.t5xxl, m.vae) == (
            "models/flux1-dev.safetensors", "models/clip_l.safetensors", "models/t5xxl_fp16.safetensors", "models/ae.safetensors")
        t = cfg.training
        assert t.gradient_checkpointing and t.mixed_precision == "bf16" and cfg.dataset.cache_latents
        assert (t.timestep_sampling, t.model_prediction_type, t.guidance_scale) == ("flux_shift", "raw", 1.0)
        assert not cfg.network.train_text_encoder  # the text embeddings are cached and the encoders leave the GPU
    # Less memory: a smaller batch, more blocks in CPU memory, then an optimizer with less state.
    assert [flux[g].training.train_batch_size for g in (12, 16, 24)] == [1, 1, 2]
    assert [flux[g].training.blocks_to_swap for g in (12, 16, 24)] == [16, 8, 0]
    assert [flux[g].optimizer.type for g in (12, 16, 24)] == ["Adafactor", "AdamW", "AdamW"]
    sd35 = {size: load_preset(f"sd35-{size}-lora").config for size in ("medium", "large")}
    for cfg in sd35.values():
        assert cfg.model.family == "sd3" and cfg.model.clip_g and cfg.training.weighting_scheme == "logit_normal"
    assert (sd35["medium"].model.fp8_base, sd35["large"].model.fp8_base) == (False, True)

    prodigy = load_preset("sdxl-prodigy").config
    assert prodigy.model.family == "sdxl" and prodigy.optimizer.type == "Prodigy"
    assert prodigy.optimizer.d_coef == 1.0 and prodigy.optimizer.use_bias_correction


# ------------------------------------------------------------------------------ round trip, sparse
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_round_trip_load_save_load_is_identical(path: Path, tmp_path: Path):
    first = read_preset(path)
    saved_once = save_preset(first.config, "copy", first.description, user_dir=tmp_path)
    second = read_preset(saved_once.path)
    assert second.config == first.config
    assert second.config.config_hash() == first.config.config_hash()
    assert second.description == first.description
    # Saving what was loaded writes the very same file again.
    text = saved_once.path.read_text()
    save_preset(second.config, "copy", second.description, user_dir=tmp_path, overwrite=True)
    assert saved_once.path.read_text() == text


def test_sparse_saving_writes_only_what_differs(tmp_path: Path):
    assert saved(tmp_path, TrainingConfig()) == {"schema_version": SCHEMA_VERSION, "name": "mine", "description": ""}

    cfg = resolve({"saving": {"save_every_n_epochs": 1, "save_last_n_epochs": 2}, "network": {"rank": 8}})
    data = saved(tmp_path, cfg, "two")
    assert {k: v for k, v in data.items() if k not in ("schema_version", "name", "description")} == {
        "network": {"rank": 8}, "saving": {"save_every_n_epochs": 1, "save_last_n_epochs": 2}}


def test_sparse_saving_of_another_optimizer_and_of_steps():
    cfg = resolve({"optimizer": {"type": "Prodigy", "d_coef": 0.8}, "training": {"max_train_steps": 500}})
    # Prodigy's own defaults (learning_rate 1.0, weight_decay 0) are not written; the type is.
    assert sparse_overrides(cfg) == {"optimizer": {"type": "Prodigy", "d_coef": 0.8},
                                     "training": {"max_train_steps": 500}}
    assert resolve(sparse_overrides(cfg)) == cfg


def test_a_loha_network_round_trips_through_save_load_and_the_sparse_form(tmp_path: Path):
    cfg = resolve({"network": {"type": "loha", "rank": 4, "conv_rank": 2, "use_tucker": True}})
    # LoHa's own defaults (rank 8, alpha 8) are not written; the type and what differs from them are.
    assert sparse_overrides(cfg) == {"network": {"type": "loha", "rank": 4, "conv_rank": 2, "use_tucker": True}}
    path = save_preset(cfg, "loha", user_dir=tmp_path).path
    assert json.loads(path.read_text())["network"] == {"type": "loha", "rank": 4, "conv_rank": 2, "use_tucker": True}
    again = read_preset(path).config
    assert again == cfg and again.network.alpha == 8.0 and again.config_hash() == cfg.config_hash()
    lokr = resolve({"network": {"type": "lokr", "lokr_factor": 4}})
    assert sparse_overrides(lokr) == {"network": {"type": "lokr", "lokr_factor": 4}}
    assert resolve(sparse_overrides(lokr)) == lokr


def test_an_old_network_section_without_a_type_is_a_lora():
    cfg = resolve({"network": {"rank": 8, "dropout": 0.1}})
    assert (cfg.network.type, cfg.network.rank, cfg.network.dropout) == ("lora", 8, 0.1)
    assert sparse_overrides(cfg) == {"network": {"rank": 8, "dropout": 0.1}}  # no type written for the default
    assert cfg.config_hash() == resolve({"network": {"type": "lora", "rank": 8, "dropout": 0.1}}).config_hash()
    # init_weights is the other name of network_weights, in a file and in --set.
    assert resolve({"network": {"init_weights": "a.safetensors"}}).network.network_weights == "a.safetensors"
    assert resolve({}, ["network.init_weights=b.safetensors"]).network.network_weights == "b.safetensors"
    assert errors({"network": {"init_weights": "a", "network_weights": "b"}}) == [
        "network.init_weights: another name for network.network_weights, which is set too; keep one"]


def test_switching_a_sections_type_starts_it_afresh():
    merged = presets.deep_merge({"network": {"type": "locon", "dropout": 0.1, "conv_rank": 4}},
                                {"network": {"type": "loha", "rank": 4}})
    assert merged == {"network": {"type": "loha", "rank": 4}}  # locon's dropout and conv_rank do not carry over
    # The same type (a section without one is a lora) merges as any section does.
    assert presets.deep_merge({"network": {"rank": 4}}, {"network": {"type": "lora"}}) == {
        "network": {"rank": 4, "type": "lora"}}
    assert presets.deep_merge({"optimizer": {"type": "Prodigy", "d_coef": 2}}, {"optimizer": {"type": "SGD"}}) == {
        "optimizer": {"type": "SGD"}}
    # So a preset's network type applies on top of the defaults' lora, and --set switches it.
    cfg = resolve({"network": {"type": "locon", "dropout": 0.1}}, ["network.type=loha"])
    assert cfg.network.type == "loha" and cfg.network.rank == 8


def test_sparse_form_round_trips_many_configs():
    cases = [
        {"optimizer": {"type": "Lion", "betas": [0.95, 0.98]}},
        {"optimizer": {"type": "Adafactor", "relative_step": True}, "scheduler": {"type": "constant"}},
        {"optimizer": {"type": "SGD", "nesterov": True}, "training": {"max_train_steps": 7}},
        {"sampling": {"prompts": ["a", "b"], "every_n_steps": 5}, "dataset": {"validation_split": 0.2}},
        {"network": {"target_modules": ["to_q", "to_v"]}, "model": {"v_parameterization": False}},
        {"launch": {"num_machines": 2, "num_processes": 2, "main_process_ip": "10.0.0.1", "gpu_ids": "0,1"}},
    ]
    for case in cases:
        cfg = resolve(case)
        assert resolve(sparse_overrides(cfg)) == cfg, case


# ------------------------------------------------------------------------------ unknown keys, types
def test_unknown_key_names_the_closest_valid_key():
    assert errors({"saving": {"save_last_n_epoch": 2}}) == [
        "saving.save_last_n_epoch: unknown setting; did you mean saving.save_last_n_epochs?"]
    # A section key at the wrong level is found in its section.
    assert errors({"save_last_n_epochs": 2}) == [
        "save_last_n_epochs: unknown setting; did you mean saving.save_last_n_epochs?"]
    assert errors({"optimizer": {"type": "Prodigy", "d_coeff": 2}}) == [
        "optimizer.d_coeff: unknown setting; did you mean optimizer.d_coef?"]
    assert errors({"modle": {"family": "sdxl"}}) == ["modle: unknown setting; did you mean model?"]
    assert errors({"training": {"zzz_qqq": 1}}) == [
        "training.zzz_qqq: unknown setting (not a field of this section)"]


def test_a_field_of_another_optimizer_says_which():
    assert errors({"optimizer": {"d_coef": 2}}) == [
        "optimizer.d_coef: not a setting of the AdamW optimizer; it belongs to Prodigy (set optimizer.type)"]
    assert errors({"optimizer": {"type": "SGD", "eps": 1e-8}}) == [
        "optimizer.eps: not a setting of the SGD optimizer; it belongs to AdamW, AdamW8bit, Prodigy and "
        "DAdaptAdam (set optimizer.type)"]


def test_a_field_of_another_network_type_says_which():
    assert errors({"network": {"type": "loha", "dropout": 0.1}}) == [
        "network.dropout: not a setting of the loha network; it belongs to lora, locon and dora (set network.type)"]
    assert errors({"network": {"conv_rank": 4}}) == [  # no type: a lora
        "network.conv_rank: not a setting of the lora network; it belongs to locon, loha, lokr and dora "
        "(set network.type)"]
    assert errors({"network": {"type": "lokr", "lokr_factr": 4}}) == [
        "network.lokr_factr: unknown setting; did you mean network.lokr_factor?"]
    assert errors({"network": {"type": "lohaa"}}) == [
        "network: unknown network type 'lohaa'; choose one of lora, locon, loha, lokr, dora"]
    assert presets.unknown_key_lines({"network": {"type": "dora", "init_weights": "x.safetensors"}}) == []


def test_unknown_keys_and_other_errors_are_reported_together():
    lines = errors({"training": {"train_batch_size": 0, "max_epochs": 3}})
    assert "training.max_epochs: unknown setting; did you mean training.max_train_epochs?" in lines
    assert "training.train_batch_size: must be at least 1; got 0" in lines


def test_unknown_key_in_a_file_and_in_set(tmp_path: Path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"schema_version": 1, "dataset": {"resolutoin": 768}}))
    with pytest.raises(ConfigError) as e:
        load_config_or_preset(path)
    assert e.value.lines == ["dataset.resolutoin: unknown setting; did you mean dataset.resolution?"]
    assert errors({}, ["saving.save_every_n_epoch=2"]) == [
        "saving.save_every_n_epoch: unknown setting; did you mean saving.save_every_n_epochs?"]


def test_wrong_type_messages():
    assert errors({"training": {"train_batch_size": "four"}}) == [
        "training.train_batch_size: input should be a valid integer, unable to parse string as an integer; got 'four'"]
    assert errors({"optimizer": {"type": "Adam"}}) == [
        "optimizer: unknown optimizer 'Adam'; choose one of AdamW, AdamW8bit, Prodigy, DAdaptAdam, DAdaptLion, Lion, Adafactor, SGD"]
    assert errors({"dataset": {"resolution": 500}}) == ["dataset.resolution: must be a multiple of 8; got 500"]
    assert errors({"training": {"gradient_checkpointing": "sometimes"}})[0].startswith(
        "training.gradient_checkpointing: input should be a valid boolean")
    assert errors({"sampling": {"prompts": "one prompt"}})[0].startswith("sampling.prompts: input should be a valid list")
    assert errors({"network": 16})[0].startswith("network: input should be a valid dictionary")
    assert errors({"training": {"mixed_precision": "fp8"}}) == [
        "training.mixed_precision: must be one of 'no', 'fp16' or 'bf16'; got 'fp8'"]


def test_preset_meta_must_be_text(tmp_path: Path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"schema_version": 1, "name": 5}))
    with pytest.raises(ConfigError, match="name: must be text"):
        read_preset(path)


# ------------------------------------------------------------------------------------------ migrations
def test_frozen_copies_exist_for_every_version_and_every_shipped_preset():
    versions = {int(p.name[1:]) for p in FIXTURES.iterdir() if p.is_dir()}
    assert versions == set(range(1, SCHEMA_VERSION + 1))
    frozen_names = {p.stem for p in FROZEN}
    assert {p.stem for p in SHIPPED} <= frozen_names, "freeze a copy of each new shipped preset in tests/fixtures"


@pytest.mark.parametrize("path", FROZEN, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_frozen_old_presets_still_load(path: Path):
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == int(path.parent.name[1:])
    preset = read_preset(path)
    assert preset.config.schema_version == SCHEMA_VERSION
    assert preset.file_version == raw["schema_version"]


def test_the_frozen_v1_library_keeps_its_values():
    char = read_preset(FIXTURES / "v1" / "sd15-character-prodigy.json").config
    assert (char.optimizer.type, char.optimizer.d_coef, char.optimizer.weight_decay) == ("Prodigy", 1.0, 0.01)
    assert read_preset(FIXTURES / "v1" / "sdxl-lora-12gb.json").config.training.train_batch_size == 1


def _v1_to_v2(d: dict) -> dict:  # synthetic: v2 renamed training.epochs -> training.max_train_epochs
    d.setdefault("training", {})["max_train_epochs"] = d.get("training", {}).pop("epochs", 10)
    return d


def _v2_to_v3(d: dict) -> dict:  # synthetic: v3 moved top-level "seed" into training
    if "seed" in d:
        d["training"]["seed"] = d.pop("seed")
    return d


def test_migration_mechanism_applies_each_step_in_order():
    old = {"schema_version": 1, "name": "old", "seed": 7, "training": {"epochs": 3}}
    new = migrate(old, migrations={1: _v1_to_v2, 2: _v2_to_v3}, current=3)
    assert new == {"schema_version": 3, "name": "old", "training": {"max_train_epochs": 3, "seed": 7}}
    assert old == {"schema_version": 1, "name": "old", "seed": 7, "training": {"epochs": 3}}  # untouched
    mid = {"schema_version": 2, "seed": 1, "training": {"max_train_epochs": 4}}
    assert migrate(mid, migrations={1: _v1_to_v2, 2: _v2_to_v3}, current=3)["training"] == {
        "max_train_epochs": 4, "seed": 1}
    # The result of a synthetic migration is a valid current config once renumbered.
    assert resolve({**new, "schema_version": SCHEMA_VERSION}).training.max_train_epochs == 3


def test_migration_errors_are_plain():
    with pytest.raises(ConfigError, match="no migration from version 1 to 2"):
        migrate({"schema_version": 1}, migrations={}, current=2)
    with pytest.raises(ConfigError, match=r"written by a newer Lathe \(schema 9\)"):
        migrate({"schema_version": 9})
    for bad in ("1", 0, 1.5, True, None):
        with pytest.raises(ConfigError, match="schema_version: must be a whole number"):
            migrate({"schema_version": bad})
    assert migrate({"run_name": "x"}) == {"run_name": "x"}  # no version: a current, hand-written file


def test_migration_registry(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(presets, "MIGRATIONS", {})
    presets.migration(1)(_v1_to_v2)
    assert {1: _v1_to_v2} == presets.MIGRATIONS
    with pytest.raises(ValueError, match="already registered"):
        presets.migration(1)(_v2_to_v3)
    assert migrate({"schema_version": 1, "training": {"epochs": 2}}, current=2)["training"] == {"max_train_epochs": 2}


def test_registered_migrations_are_contiguous():
    assert set(presets.MIGRATIONS) == set(range(1, SCHEMA_VERSION))


# ---------------------------------------------------------------------------------- names, storage
@pytest.mark.parametrize("bad", ["../evil", "a/b", "a\\b", "..", "...", ".hidden", "", "   ", "x..y", "con",
                                 "NUL.txt", "a" * 81, "tab\there", "new\nline", "nul\x00byte", "/etc/passwd",
                                 "C:\\presets\\x", "trailing."])
def test_unsafe_names_are_refused(bad: str, tmp_path: Path):
    with pytest.raises(ConfigError, match="^preset name: "):
        sanitize_preset_name(bad)
    with pytest.raises(ConfigError):
        save_preset(TrainingConfig(), bad, user_dir=tmp_path / "user")
    outside = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert outside == []


def test_safe_names_are_kept():
    assert sanitize_preset_name("My preset (v2)") == "My preset (v2)"
    assert sanitize_preset_name("  sdxl_16gb-v1.2  ") == "sdxl_16gb-v1.2"
    assert sanitize_preset_name("mine.json") == "mine"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_saving_never_overwrites_a_shipped_preset(tmp_path: Path):
    shipped = ROOT / "presets" / "sd15-character-prodigy.json"
    before = _digest(shipped)
    for name in ("sd15-character-prodigy", "SD15-Character-Prodigy", "sd15-character-prodigy.json"):
        with pytest.raises(ConfigError, match="is a shipped preset"):
            save_preset(TrainingConfig(), name, user_dir=tmp_path, overwrite=True)
    with pytest.raises(ConfigError, match="is a shipped preset"):
        delete_preset("sdxl-prodigy", user_dir=tmp_path)
    assert _digest(shipped) == before
    assert list(tmp_path.iterdir()) == []


def test_overwriting_a_user_preset_needs_the_flag(tmp_path: Path):
    first = save_preset(resolve({"network": {"rank": 4}}), "mine", user_dir=tmp_path)
    with pytest.raises(PresetExistsError, match="already exists"):
        save_preset(resolve({"network": {"rank": 8}}), "mine", user_dir=tmp_path)
    assert read_preset(first.path).config.network.rank == 4
    save_preset(resolve({"network": {"rank": 8}}), "mine", user_dir=tmp_path, overwrite=True)
    assert read_preset(first.path).config.network.rank == 8
    assert [p.name for p in tmp_path.iterdir()] == ["mine.json"]  # no temp file left behind


def test_list_find_load_delete(tmp_path: Path):
    save_preset(resolve({"network": {"rank": 4}}), "zeta", "my own", user_dir=tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / ".hidden.json").write_text("{}")
    listing = list_presets(tmp_path)
    by_name = {(p.source, p.name): p for p in listing}
    assert ("shipped", "sdxl-prodigy") in by_name and ("user", "zeta") in by_name
    assert ("user", ".hidden") not in by_name
    assert by_name[("user", "zeta")].description == "my own"
    assert "not readable JSON" in by_name[("user", "broken")].error
    assert [p.source for p in listing] == sorted(p.source for p in listing)  # shipped first

    assert find_preset("zeta", tmp_path) == (tmp_path / "zeta.json", "user")
    assert load_preset("zeta", tmp_path).source == "user"
    with pytest.raises(ConfigError, match="did you mean 'sdxl-prodigy'"):
        find_preset("sdxl-prodigi", tmp_path)
    assert delete_preset("zeta", tmp_path) == tmp_path / "zeta.json"
    with pytest.raises(ConfigError, match="not found"):
        load_preset("zeta", tmp_path)


def test_user_presets_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("LATHE_PRESETS_DIR", raising=False)
    assert user_presets_dir() == Path("runs") / ".presets"
    assert user_presets_dir(tmp_path) == tmp_path / ".presets"
    monkeypatch.setenv("LATHE_PRESETS_DIR", str(tmp_path / "elsewhere"))
    assert user_presets_dir() == tmp_path / "elsewhere"
    cfg = resolve({"network": {"rank": 4}})
    assert save_preset(cfg, "env").path == tmp_path / "elsewhere" / "env.json"


# ------------------------------------------------------------------------------------------ secrets
def test_secrets_are_never_written(tmp_path: Path):
    token = "hf_" + "a1B2c3D4e5" * 3
    cfg = resolve({
        "model": {"pretrained_model": "https://user:s3cret@example.com/model.safetensors"},
        "sampling": {"prompts": ["a cat", f"my token is {token}"]},
        "dataset": {"keep_tokens": 2},
    })
    result = save_preset(cfg, "shared", f"made with {token}", user_dir=tmp_path)
    text = result.path.read_text()
    assert token not in text and "s3cret" not in text
    assert sorted(result.removed_secrets) == ["description", "model.pretrained_model", "sampling.prompts"]
    assert json.loads(text)["dataset"] == {"keep_tokens": 2}  # "keep_tokens" is not a token
    assert read_preset(result.path).config.model.pretrained_model == TrainingConfig().model.pretrained_model


def test_strip_secrets_by_key_name():
    data = {"hub_token": "x", "wandb_api_key": "y", "password": "z", "launch": {"secret": 1},
            "max_token_length": 75, "keep_tokens": 1, "name": "ok"}
    clean, removed = strip_secrets(data)
    assert clean == {"max_token_length": 75, "keep_tokens": 1, "name": "ok", "launch": {}}
    assert sorted(removed) == ["hub_token", "launch.secret", "password", "wandb_api_key"]
