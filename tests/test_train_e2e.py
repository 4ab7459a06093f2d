"""The training engine end to end: the real CLI, the real launcher (the trainer started directly for one
process, through `accelerate launch` for several), the demo models on CPU."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ENV, ROOT, events, run_cli, step_losses, train

pytestmark = pytest.mark.train


def test_demo_run_writes_a_complete_version_folder(demo_run):
    v = demo_run
    assert v.name == "version_0" and v.parent.name == "demo"
    cfg = json.loads((v / "config.json").read_text())
    hparams = yaml.safe_load((v / "hparams.yaml").read_text())
    assert hparams == cfg and hparams["optimizer"]["type"] == "AdamW" and "sampling" in hparams
    command = (v / "command.txt").read_text()
    assert "-m backend.trainer --run-dir" in command and "accelerate.commands.launch" not in command  # one process
    status = json.loads((v / "status.json").read_text())
    assert status["state"] == "finished" and status["exit_code"] == 0 and status["step"] == status["total_steps"] == 64
    evs = events(v)
    assert evs[0]["event"] == "run_started" and evs[0]["total_steps"] == 64 and evs[0]["total_epochs"] == 4
    steps = [e for e in evs if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 65))
    assert all({"loss", "lr", "epoch", "samples_per_s", "eta_s"} <= e.keys() for e in steps)
    assert [e["epoch"] for e in events(v, "epoch_end")] == [1, 2, 3, 4]
    assert evs[-1] == {**evs[-1], "event": "run_finished", "state": "finished", "step": 64, "error": None}
    assert (v / "exports" / "demo.safetensors").is_file()
    assert sorted(p.name for p in (v / "samples").iterdir()) == ["epoch-000002", "final"]
    assert sorted(p.name for p in (v / "samples" / "final").glob("*.png")) == ["0.png", "1.png"]
    assert len(events(v, "sample_saved")) == 4
    assert list((v / "tensorboard").glob("events.out.tfevents.*"))
    assert "training demo: 64 steps" in (v / "train.log").read_text()


def test_loss_goes_down_on_the_demo_set(demo_run):
    losses = [e["loss"] for e in events(demo_run, "step")]
    first, last = sum(losses[:16]) / 16, sum(losses[-16:]) / 16
    assert last < first * 0.97, (first, last)


def test_kohya_export_loads_in_diffusers_with_its_alpha(demo_run, demo):
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = demo_run / "exports" / "demo.safetensors"
    sd = load_file(path)
    assert all(k.startswith("lora_unet_") for k in sd)
    meta = safe_open(str(path), "pt").metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_steps"] == "64" and meta["ss_optimizer"].startswith("torch.optim.AdamW(")
    assert json.loads(meta["ss_dataset_dirs"])["5_shape"] == {"n_repeats": 5, "img_count": 12}
    # What A1111's LoRA panel shows, as sd-scripts counts it: tags per folder (a caption's comma-separated
    # parts, lower-cased, once per image; class words for an image without a caption file), buckets
    # (counted with repeats), batch figures, modelspec resolution and date.
    want: dict[str, dict[str, int]] = {}
    for folder in sorted((demo / "images").iterdir()):
        counts = want.setdefault(folder.name, {})
        for img in sorted(folder.glob("*.png")):
            cap = img.with_suffix(".txt")
            caption = cap.read_text().strip() if cap.exists() else folder.name.split("_", 1)[1]
            for tag in (t.strip().lower() for t in caption.split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
    assert json.loads(meta["ss_tag_frequency"]) == want and want["2_yellow star"] == {"yellow star": 2}
    buckets = json.loads(meta["ss_bucket_info"])
    assert sum(b["count"] for b in buckets["buckets"].values()) == 12 * 5 + 2 * 2
    assert all(len(b["resolution"]) == 2 and b["resolution"][0] % 32 == 0 for b in buckets["buckets"].values())
    assert 0 <= buckets["mean_img_ar_error"] < 1
    assert (meta["ss_total_batch_size"], meta["ss_num_batches_per_epoch"], meta["modelspec.resolution"]) == ("4", "16", "64x64")
    import datetime

    assert datetime.datetime.fromisoformat(meta["modelspec.date"]).year >= 2026

    pipe = StableDiffusionPipeline.from_pretrained(demo / "model", safety_checker=None, local_files_only=True)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    before = pipe.unet.get_submodule(name).weight.detach().clone()
    pipe.load_lora_weights(str(path), adapter_name="demo")
    assert pipe.get_list_adapters() == {"unet": ["demo"]}
    pipe.fuse_lora(lora_scale=1.0)
    layer = pipe.unet.get_submodule(name)
    after = (layer.base_layer if hasattr(layer, "base_layer") else layer).weight.detach()
    key = "lora_unet_" + name.replace(".", "_")
    down, up, alpha = sd[key + ".lora_down.weight"].float(), sd[key + ".lora_up.weight"].float(), sd[key + ".alpha"].item()
    expected = (alpha / down.shape[0]) * up @ down
    assert expected.abs().max() > 1e-3  # training moved the weights
    torch.testing.assert_close(after - before, expected, atol=1e-6, rtol=1e-3)


def test_a_run_started_from_a_lora_file_begins_at_its_weights(demo_run, demo, tmp_path):
    """network.network_weights: the demo's trained LoRA as the start of a new run (same seed, so the
    same first batch, noise and timesteps): its first step's loss is the trained LoRA's, below the
    fresh start's, and the new run's state began from the file, not from zero."""
    start = demo_run / "exports" / "demo.safetensors"
    proc, v = train(tmp_path, demo, run_name="again", network={"network_weights": str(start)},
                    training={"max_train_steps": 2, "max_train_epochs": None},
                    saving={"save_every_n_epochs": None, "save_last_n_epochs": None}, sampling={"prompts": []})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"network.network_weights: started from {start}" in (v / "train.log").read_text()
    fresh, again = step_losses(demo_run), step_losses(v)
    assert again[1] < fresh[1] * 0.9, (fresh[1], again[1])

    bad = tmp_path / "missing.safetensors"
    proc, _ = train(tmp_path, demo, run_name="bad", network={"network_weights": str(bad)})
    assert proc.returncode != 0 and f"network.network_weights: file {bad} does not exist" in proc.stdout + proc.stderr


def test_sdxl_with_text_encoders_trains_and_exports(demo, tmp_path):
    proc, v = train(tmp_path, demo, run_name="sdxl", model={"pretrained_model": str(demo / "model-sdxl")},
                    network={"train_text_encoder": True}, training={"max_train_steps": 6, "max_train_epochs": None},
                    saving={"save_every_n_epochs": None, "save_last_n_epochs": None}, sampling={"prompts": ["a red circle"]})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert events(v, "run_started")[0]["family"] == "sdxl"
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    sd = load_file(v / "exports" / "sdxl.safetensors")
    prefixes = {k.split("_")[1] for k in sd}
    assert prefixes == {"unet", "te1", "te2"}
    assert all("text_model_encoder_layers" in k for k in sd if k.startswith("lora_te"))
    pipe = StableDiffusionXLPipeline.from_pretrained(demo / "model-sdxl", local_files_only=True)
    pipe.load_lora_weights(str(v / "exports" / "sdxl.safetensors"), adapter_name="x")
    assert pipe.get_list_adapters() == {"unet": ["x"], "text_encoder": ["x"], "text_encoder_2": ["x"]}
    assert (v / "samples" / "final" / "0.png").is_file()


def test_prodigy_d_coef_reaches_the_optimizer(demo, tmp_path):
    proc, v = train(tmp_path, demo, optimizer={"type": "Prodigy", "d_coef": 0.37, "use_bias_correction": True,
                                               "safeguard_warmup": True, "weight_decay": 0.01, "learning_rate": 1.0},
                    training={"max_train_steps": 3, "max_train_epochs": None}, sampling={"prompts": []},
                    logging={"log_every_n_steps": 2})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = events(v, "step")  # losses are read back two at a time, but every step has its event, dated when it ran
    assert [e["step"] for e in steps] == [1, 2, 3] and steps[0]["time"] <= steps[1]["time"] <= steps[2]["time"]
    opt = events(v, "run_started")[0]["optimizer"]
    assert opt["class"] == "Prodigy"
    assert (opt["d_coef"], opt["use_bias_correction"], opt["safeguard_warmup"], opt["weight_decay"]) == (0.37, True, True, 0.01)
    ds = [e["d"] for e in events(v, "step")]
    assert len(ds) == 3 and all(d is not None and d > 0 for d in ds)


def test_cached_and_uncached_latents_give_the_same_first_step_loss_and_skip_a_corrupt_image(demo, tmp_path):
    """One corrupt image among the demo's: cached, it is skipped while the cache fills; uncached, when
    its folder is scanned. Either way with a warning naming it, and the same losses."""
    images = tmp_path / "images"
    shutil.copytree(demo / "images", images)
    (images / "5_shape" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    losses = []
    for cache in (True, False):
        proc, v = train(tmp_path, demo, dataset={"train_data_dir": str(images), "cache_latents": cache,
                                                 "num_workers": 0 if cache else 1},
                        training={"max_train_steps": 2, "max_train_epochs": None}, sampling={"prompts": []})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        losses.append([e["loss"] for e in events(v, "step")])
        warnings = [e["message"] for e in events(v, "warning")]
        assert any("broken.png" in w for w in warnings), (cache, warnings)
        assert events(v, "run_started")[0]["images"] == 14
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_bad_config_prints_field_errors_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"network": {"rank": 0}, "optimizer": {"type": "Prodigy", "d_coeff": 2}}))
    for cmd in ("validate", "train"):
        proc = run_cli(cmd, str(bad))
        assert proc.returncode == 2
        assert "network.rank: must be at least 1; got 0" in proc.stderr
        assert "optimizer.d_coeff: unknown setting; did you mean optimizer.d_coef?" in proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"model": {"pretrained_model": str(tmp_path / "nope")}, "output_dir": str(tmp_path)}))
    proc = run_cli("train", str(missing))
    assert proc.returncode == 2 and f"model.pretrained_model: {tmp_path / 'nope'} does not exist" in proc.stderr
    assert not (tmp_path / "lora").exists()  # nothing was started


def test_validate_json_prints_the_resolved_config():
    proc = run_cli("validate", str(ROOT / "presets" / "demo.json"), "--json", "--set", "optimizer.type=Prodigy",
                   "--set", "optimizer.d_coef=0.8")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["optimizer"]["d_coef"] == 0.8 and data["network"]["rank"] == 4 and data["scheduler"]["type"] == "constant"


def test_cli_and_backend_modules_do_not_import_torch():
    code = (
        "import sys, importlib\n"
        "for m in ['backend.__main__', 'backend.config', 'backend.presets', 'backend.kohya', 'backend.runs', "
        "'backend.events', 'backend.launcher', 'backend.checkpoints', 'backend.follow', 'backend.preflight']:\n"
        "    importlib.import_module(m)\n"
        "bad = [m for m in ('torch', 'diffusers', 'peft', 'transformers', 'gradio') if m in sys.modules]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_single_file_checkpoint_trains_offline(demo, tmp_path):
    """The demo model converted to one LDM-layout .safetensors file (what most users have) trains."""
    proc, v = train(tmp_path, demo, model={"pretrained_model": str(demo / "model.safetensors")},
                    training={"max_train_steps": 2, "max_train_epochs": None}, sampling={"prompts": []},
                    saving={"save_every_n_epochs": None, "save_last_n_epochs": None})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert events(v, "run_started")[0]["family"] == "sd15"
    assert (v / "exports" / "demo.safetensors").is_file()


def test_gradient_checkpointing_trains_unet_and_text_encoder_the_same(demo, tmp_path):
    from safetensors.torch import load_file

    losses = []
    for gc in (False, True):
        proc, v = train(tmp_path, demo, network={"train_text_encoder": True}, sampling={"prompts": []},
                        training={"max_train_steps": 3, "max_train_epochs": None, "gradient_checkpointing": gc},
                        saving={"save_every_n_epochs": None, "save_last_n_epochs": None})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        losses.append([e["loss"] for e in events(v, "step")])
        sd = load_file(v / "exports" / "demo.safetensors")
        ups = {k: t for k, t in sd.items() if k.endswith("lora_up.weight")}
        assert any(k.startswith("lora_te_") for k in ups) and all(t.abs().max() > 0 for t in ups.values())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
