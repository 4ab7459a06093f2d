"""Config validation: every cross-field rule, with the message a user sees."""

from __future__ import annotations

import pytest

from backend.config import ConfigError, TrainingConfig, config_warnings, validate_config
from backend.presets import resolve


def errors(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        resolve(data)
    return e.value.lines


def test_defaults_are_valid_and_prodigy_defaults():
    cfg = TrainingConfig()
    assert cfg.optimizer.type == "AdamW"
    p = resolve({"optimizer": {"type": "Prodigy"}}).optimizer
    assert (p.d_coef, p.learning_rate, p.d0, p.decouple, p.use_bias_correction, p.safeguard_warmup) == (
        1.0, 1.0, 1e-6, True, False, False)
    assert p.betas == (0.9, 0.999) and p.weight_decay == 0.0 and p.growth_rate is None


def test_every_discriminated_section_is_found_with_its_types():
    from backend.config import NETWORK_TYPES, OPTIMIZER_TYPES, LoHaNetwork, ProdigyConfig
    from backend.config_keys import (
        default_type,
        implied_type,
        optimizer_classes,
        setting_paths,
        union_classes,
    )

    assert list(union_classes("network")) == NETWORK_TYPES and list(optimizer_classes()) == OPTIMIZER_TYPES
    assert union_classes("network")["loha"] is LoHaNetwork and optimizer_classes()["Prodigy"] is ProdigyConfig
    assert union_classes("training") == {}
    assert (default_type("network"), implied_type("network")) == ("lora", "lora")
    assert (default_type("optimizer"), implied_type("optimizer")) == ("AdamW", None)  # an optimizer says its type
    paths = setting_paths()
    assert {"network.type", "network.dropout", "network.conv_rank", "network.lokr_factor", "network.use_tucker",
            "optimizer.d_coef"} <= set(paths) and "network.init_weights" not in paths


def test_network_types_have_their_own_defaults_and_rules():
    loha = resolve({"network": {"type": "loha"}}).network
    assert (loha.rank, loha.alpha, loha.conv_rank, loha.use_tucker) == (8, 8.0, 0, False)
    assert errors({"network": {"type": "loha", "use_tucker": True}})[0].startswith(
        "network.use_tucker: Tucker decomposition applies to the 3x3 convolutions")
    assert errors({"network": {"type": "loha", "conv_rank": -1}}) == ["network.conv_rank: must be at least 0; got -1"]
    assert errors({"network": {"type": "lokr", "lokr_factor": 0}}) == [
        "network.lokr_factor: must be -1 (automatic) or a positive factor; got 0"]


def test_exactly_one_of_epochs_or_steps():
    assert errors({"training": {"max_train_epochs": 3, "max_train_steps": 10}}) == [
        "training.max_train_epochs: set exactly one of max_train_epochs or max_train_steps (both are set; clear one)"]
    assert errors({"training": {"max_train_epochs": None}}) == [
        "training.max_train_epochs: set exactly one of max_train_epochs or max_train_steps (neither is set; clear one)"]
    # A sparse override of one of them clears the other.
    assert resolve({"training": {"max_train_steps": 10}}).training.max_train_epochs is None


def test_save_last_n_needs_save_every_n():
    assert errors({"saving": {"save_last_n_epochs": 2}}) == [
        "saving.save_last_n_epochs: needs save_every_n_epochs (how often to save an epoch checkpoint)"]
    assert errors({"saving": {"save_last_n_steps": 2}}) == [
        "saving.save_last_n_steps: needs save_every_n_steps (how often to save a step checkpoint)"]
    resolve({"saving": {"save_every_n_epochs": 1, "save_last_n_epochs": 2}})


def test_prodigy_rules():
    lines = errors({"optimizer": {"type": "Prodigy", "unet_lr": 1.0, "text_encoder_lr": 0.5},
                    "network": {"train_text_encoder": True}})
    assert lines == ["optimizer.text_encoder_lr: Prodigy needs one learning rate for UNet and text encoder "
                     "(unet_lr 1.0 != text_encoder_lr 0.5); scale the step with d_coef instead"]
    # Same rates, or the text encoder not trained: fine.
    resolve({"optimizer": {"type": "Prodigy", "unet_lr": 1.0, "text_encoder_lr": 1.0}, "network": {"train_text_encoder": True}})
    resolve({"optimizer": {"type": "Prodigy", "unet_lr": 1.0, "text_encoder_lr": 0.5}})
    warns = config_warnings(resolve({"optimizer": {"type": "Prodigy", "learning_rate": 1e-4}}))
    assert "optimizer.learning_rate: Prodigy sets its own step size and expects about 1.0 (got 0.0001); " \
           "tune optimizer.d_coef instead" in warns
    assert not config_warnings(resolve({"optimizer": {"type": "Prodigy"}}))


def test_unknown_fields_and_optimizer_args_are_errors():
    assert errors({"optimizer": {"type": "Prodigy", "d_coeff": 2}}) == [
        "optimizer.d_coeff: unknown setting; did you mean optimizer.d_coef?"]
    assert errors({"optimizer": {"type": "Prodigi"}}) == [
        "optimizer: unknown optimizer 'Prodigi'; choose one of AdamW, AdamW8bit, Prodigy, DAdaptAdam, DAdaptLion, Lion, Adafactor, SGD"]
    # d_coef belongs to Prodigy only.
    assert errors({"optimizer": {"type": "AdamW", "d_coef": 2}}) == [
        "optimizer.d_coef: not a setting of the AdamW optimizer; it belongs to Prodigy (set optimizer.type)"]


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"dataset": {"resolution": 500}}, "dataset.resolution: must be a multiple of 8; got 500"),
        ({"network": {"rank": 0}}, "network.rank: must be at least 1; got 0"),
        ({"network": {"rank": "x"}}, "network.rank: input should be a valid integer, unable to parse string as an integer; got 'x'"),
        ({"optimizer": {"type": "Prodigy", "d_coef": -1}}, "optimizer.d_coef: must be greater than 0; got -1"),
        ({"training": {"mixed_precision": "fp8"}}, "training.mixed_precision: must be one of 'no', 'fp16' or 'bf16'; got 'fp8'"),
        ({"run_name": ".hidden"}, "run_name: use 1-80 letters, digits, '.', '_' or '-', not starting with '.' (it names a folder)"),
        ({"run_name": "../x"}, "run_name: use 1-80 letters, digits, '.', '_' or '-', not starting with '.' (it names a folder)"),
        ({"launch": {"gpu_ids": "0;rm -rf"}}, "launch.gpu_ids: use 'all' or GPU numbers separated by commas, e.g. 0,1; got '0;rm -rf'"),
        ({"launch": {"num_machines": 2}}, "launch.main_process_ip: several machines need the address of machine 0"),
        ({"launch": {"num_machines": 2, "machine_rank": 2, "main_process_ip": "10.0.0.1"}},
         "launch.machine_rank: must be below num_machines (2 >= 2)"),
        ({"launch": {"num_machines": 3, "num_processes": 8, "main_process_ip": "10.0.0.1"}},
         "launch.num_processes: counts the processes of all machines together and must be a multiple of "
         "num_machines (8 processes on 3 machines)"),
        ({"dataset": {"min_bucket_reso": 1024, "max_bucket_reso": 512}},
         "dataset.min_bucket_reso: must not be larger than max_bucket_reso (1024 > 512)"),
        ({"dataset": {"validation_split": 0.1, "validation_data_dir": "val"}},
         "dataset.validation_data_dir: set either validation_split or validation_data_dir, not both"),
        ({"network": {"train_unet": False}}, "network.train_unet: nothing to train: enable train_unet or train_text_encoder (or both)"),
        ({"dataset": {"caption_extension": "txt"}}, "dataset.caption_extension: must start with '.' followed by letters or digits, e.g. .txt; got 'txt'"),
        ({"launch": {"device": "cpu", "gpu_ids": "0"}}, "launch.gpu_ids: not used with device 'cpu'; clear it or choose device 'cuda'"),
    ],
)
def test_field_messages(data, expected):
    assert errors(data) == [expected]


def test_several_errors_are_all_reported():
    lines = errors({"network": {"rank": 0, "alpha": -1}, "training": {"train_batch_size": 0}})
    assert len(lines) == 3 and {ln.split(":")[0] for ln in lines} == {"network.rank", "network.alpha", "training.train_batch_size"}


def test_config_hash_is_stable_and_sensitive():
    a, b = resolve({}), resolve({})
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != resolve({"network": {"rank": 8}}).config_hash()


def test_full_config_round_trips():
    cfg = resolve({"optimizer": {"type": "Prodigy", "d_coef": 0.8}})
    assert validate_config(cfg.model_dump(mode="json")) == cfg
