"""The GUI in a real browser (headless Chromium via Playwright) against `python app.py` on 127.0.0.1,
doing what a user does: open the page, import a kohya_ss config, enter a bad value, train with
Prodigy to the end, watch the curves, samples and rotation, reload mid-run, stop, and resume.

The tests share one app process and one browser and run in file order (each builds on the runs
the previous ones left). Set LATHE_SCREENSHOT_DIR=docs/screenshots to refresh the docs' pictures.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.gui_helpers import (
    BROWSER_ARGS,
    AppServer,
    choose,
    chromium_or_skip,
    field,
    fill,
    http_status,
    shot,
    tab,
    wait_until,
)

pytestmark = [pytest.mark.browser, pytest.mark.train]

KOHYA = next(p / "sd15 - EDG_LoraOptiSettings.json" for p in (ROOT.parent / "shared" / "kohya-presets",
                                                                ROOT / "tests" / "fixtures" / "kohya")
             if (p / "sd15 - EDG_LoraOptiSettings.json").is_file())
KOHYA_FALLBACK = {"LoRA_type": "Standard", "network_dim": 64, "network_alpha": 64, "optimizer": "AdamW8bit",
                  "learning_rate": 0.0001, "epoch": 1, "block_alphas": "", "color_aug": False, "save_model_as": "safetensors"}
RUN_TIMEOUT = 240
STEPS_PER_EPOCH = 16  # the demo image set at batch size 4


@pytest.fixture(scope="module")
def chromium() -> str:
    return chromium_or_skip()  # before anything is built: a missing browser skips (or fails in CI) at once


@pytest.fixture(scope="module")
def server(chromium, demo, tmp_path_factory):
    work = demo.parent  # holds demo/: the demo preset's relative paths resolve here, as in a checkout
    out = tmp_path_factory.mktemp("gui") / "runs"
    app = AppServer(work, out, out.parent / "app.log")
    try:
        app.wait_ready()
        yield app
    finally:
        app.stop()


@pytest.fixture(scope="module")
def browser(chromium, server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.external = []  # requests that left 127.0.0.1 (there must be none)
    pg.on("request", lambda r: pg.external.append(r.url)
          if not r.url.startswith((server.url, "data:", "blob:")) else None)
    open_app(pg, server)
    yield pg
    context.close()


def open_app(pg, server) -> None:
    pg.goto(server.url)
    field(pg, "run_name").locator("input").wait_for()


def versions(server) -> list[Path]:
    return sorted(server.output_dir.glob("*/version_*"), key=lambda p: p.stat().st_mtime)


def run_state(pg) -> tuple[str | None, int, int]:
    """(state, step, total) as the Run tab shows them."""
    banner = pg.locator("#run-banner .lathe-banner")
    bar = pg.locator("#run-progress .lathe-progress")
    state = banner.get_attribute("data-state") if banner.count() else None
    step = int(bar.get_attribute("data-step") or 0) if bar.count() else 0
    total = int(bar.get_attribute("data-total") or 0) if bar.count() else 0
    return state, step, total


def watch_to(pg, states: tuple[str, ...], timeout: float = RUN_TIMEOUT) -> list[tuple[str | None, int, int]]:
    """Poll the Run tab until the run reaches one of `states`; every distinct reading seen."""
    seen: list[tuple[str | None, int, int]] = []

    def reached() -> bool:
        now = run_state(pg)
        if not seen or seen[-1] != now:
            seen.append(now)
        return now[0] in states

    wait_until(reached, timeout, 0.2, f"run state in {states}")
    return seen


def text_of(pg, selector: str) -> str:
    return pg.locator(selector).inner_text()


def box(pg, selector: str) -> str:
    """The text of a (read-only) text box."""
    return pg.locator(f"{selector} textarea, {selector} input").first.input_value()


# ------------------------------------------------------------------------------------ tests
def help_text_contrast(page) -> float:
    """WCAG contrast ratio of a field's help text against the page background."""
    return page.evaluate("""() => {
        const lum = (c) => { const [r, g, b] = c.match(/[\\d.]+/g).slice(0, 3).map(Number).map(v => v / 255)
            .map(v => v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4); return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
        const info = document.querySelector('.info-text');
        let el = info, bg = 'rgba(0, 0, 0, 0)';
        while (el && (bg === 'rgba(0, 0, 0, 0)' || bg === 'transparent')) { bg = getComputedStyle(el).backgroundColor; el = el.parentElement; }
        if (bg === 'rgba(0, 0, 0, 0)') bg = 'rgb(255, 255, 255)';
        const [a, b] = [lum(getComputedStyle(info).color), lum(bg)].sort((x, y) => y - x);
        return (a + 0.05) / (b + 0.05);
    }""")


def test_first_open_loads_the_demo_preset_and_fetches_nothing_from_outside(page, server, tmp_path):
    assert field(page, "run_name").locator("input").input_value() == "demo"
    assert field(page, "model.pretrained_model").locator("input").input_value() == "demo/model"
    assert field(page, "output_dir").locator("input").input_value() == str(server.output_dir)
    assert "Loaded the demo preset" in text_of(page, "#preset-status")
    assert "epochs 3 and 4, plus final" in text_of(page, "#saving-preview")
    assert not field(page, "optimizer.Prodigy.d_coef").is_visible()  # AdamW: Prodigy's fields are hidden
    assert not field(page, "dataset.caption_extension").is_visible()  # advanced: folded away
    assert help_text_contrast(page) >= 7.0  # help text readable (WCAG AAA), not Gradio's light grey
    shot(page, tmp_path, "setup", full=False)
    assert page.external == []
    # Only the output folder is served: not the code, not the demo assets next to it.
    assert http_status(f"{server.url}gradio_api/file={ROOT / 'app.py'}") == 403
    assert http_status(f"{server.url}gradio_api/file={server.output_dir.parent / 'app.log'}") == 403


def test_an_invalid_value_is_shown_next_to_its_section_and_starts_nothing(page, server, tmp_path):
    fill(page, "network.lora.rank", 0)
    fill(page, "saving.save_every_n_epochs", "")
    page.click("#btn-validate")
    network = page.locator("#err-Network")
    network.wait_for(state="visible")
    assert "Rank (network_dim): must be at least 1; got 0" in network.inner_text()
    assert "Keep newest N epoch saves: needs save_every_n_epochs" in text_of(page, "#err-Saving")
    assert "2 problems to fix in Network, Saving" in text_of(page, "#setup-summary")
    shot(page, tmp_path, "validation", "#sec-Network")
    page.click("#btn-start-setup")
    page.wait_for_timeout(1500)
    assert versions(server) == [] and network.is_visible()
    fill(page, "network.lora.rank", 4)
    fill(page, "saving.save_every_n_epochs", 1)
    page.click("#btn-validate")
    wait_until(lambda: "Valid" in text_of(page, "#setup-summary"), 20)
    assert not network.is_visible()


def test_the_network_type_shows_only_its_own_fields(page, server, tmp_path):
    assert field(page, "network.lora.rank").is_visible() and not field(page, "network.loha.conv_rank").is_visible()
    choose(page, "f-network-type", "loha")
    conv = field(page, "network.loha.conv_rank")
    conv.wait_for(state="visible")
    assert not field(page, "network.lora.rank").is_visible()
    assert field(page, "network.loha.rank").locator("input").input_value() == "8"  # LoHa's own default
    fill(page, "network.loha.conv_rank", -1)
    page.click("#btn-validate")
    network = page.locator("#err-Network")
    network.wait_for(state="visible")
    assert "Conv rank (conv_dim): must be at least 0; got -1" in network.inner_text()
    shot(page, tmp_path, "setup-loha", "#sec-Network")


def test_show_command_and_presets_save_download_upload_delete(page, server, tmp_path):
    page.click("#btn-show-command")
    command = page.locator("#command-preview textarea")
    wait_until(lambda: command.count() and "python -m backend train demo.json" in command.input_value(), 30)
    assert "-m backend.trainer --run-dir" in command.input_value()  # one process: the trainer itself
    fill(page, "network.lora.rank", 8)
    fill(page, "run_name", "mine")
    page.locator("#preset-name textarea, #preset-name input").first.fill("my preset")
    page.click("#btn-preset-save")
    status = page.locator("#preset-status")
    wait_until(lambda: "Saved preset" in status.inner_text(), 30)
    saved = json.loads((server.output_dir.parent / "user-presets" / "my preset.json").read_text())
    assert saved["network"]["rank"] == 8 and saved["run_name"] == "mine"
    with page.expect_download() as download:
        page.click("#btn-preset-download")  # one click, and the file is named after the preset
    assert download.value.suggested_filename == "my preset.json"
    path = tmp_path / "downloaded.json"
    download.value.save_as(path)
    assert json.loads(path.read_text())["network"]["rank"] == 8
    assert "my preset" in page.locator("#preset-choice input").first.input_value()  # the new preset is chosen
    choose(page, "preset-choice", "demo (shipped)")
    page.click("#btn-preset-load")
    wait_until(lambda: "Loaded preset demo" in status.inner_text(), 30)
    with page.expect_file_chooser() as chooser:
        page.click("#btn-preset-upload")
    chooser.value.set_files(str(path))
    wait_until(lambda: "Loaded **" in status.inner_text() or "downloaded.json" in status.inner_text(), 30)
    assert field(page, "network.lora.rank").locator("input").input_value() == "8"
    choose(page, "preset-choice", "my preset (user)")
    page.click("#btn-preset-delete")
    wait_until(lambda: "Deleted preset" in status.inner_text(), 30)
    assert not (server.output_dir.parent / "user-presets" / "my preset.json").exists()
    choose(page, "preset-choice", "demo (shipped)")
    page.click("#btn-preset-delete")
    wait_until(lambda: "shipped preset (read-only)" in status.inner_text(), 30)


def preset_listed(pg, label: str) -> bool:
    """Whether the preset dropdown offers `label` (opens it, looks, closes it and lets go of it: a
    dropdown that keeps the focus does not open again on the next click)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    pg.locator("#preset-choice input").first.click()
    try:
        pg.get_by_role("option", name=label, exact=True).wait_for(timeout=1500)
        found = True
    except PlaywrightTimeout:
        found = False
    pg.keyboard.press("Escape")
    pg.evaluate("document.activeElement && document.activeElement.blur()")
    return found


def test_a_saved_preset_is_listed_after_a_reload_and_in_a_new_browser_context(page, browser, server):
    page.locator("#preset-name textarea, #preset-name input").first.fill("kept preset")
    page.click("#btn-preset-save")
    wait_until(lambda: "Saved preset" in text_of(page, "#preset-status"), 30)
    try:
        page.reload()
        field(page, "run_name").locator("input").wait_for()
        wait_until(lambda: preset_listed(page, "kept preset (user)"), 20, what="the preset listed after a reload")
        other = browser.new_context().new_page()
        open_app(other, server)
        wait_until(lambda: preset_listed(other, "kept preset (user)"), 20, what="the preset listed in a new context")
        other.context.close()
    finally:
        (server.output_dir.parent / "user-presets" / "kept preset.json").unlink(missing_ok=True)


def test_validate_shows_a_missing_folder_and_a_family_mismatch_and_start_refuses_them(page, server, tmp_path):
    before = versions(server)
    missing = tmp_path / "no-such-folder"
    fill(page, "dataset.train_data_dir", missing)
    choose(page, "f-model-family", "sdxl")
    page.click("#btn-validate")
    dataset = page.locator("#err-Dataset")
    dataset.wait_for(state="visible")
    assert f"Image folder: folder {missing} does not exist" in dataset.inner_text()
    assert "Model family: set to sdxl, but demo/model is an SD 1.x model" in text_of(page, "#err-Model")
    assert "2 problems to fix in Model, Dataset" in text_of(page, "#setup-summary")
    page.click("#btn-start-setup")
    page.wait_for_timeout(1500)
    assert versions(server) == before and dataset.is_visible()


def test_a_kohya_dataset_toml_fills_the_subsets_table_and_validate_checks_each_folder(page, tmp_path):
    """The imported TOML's subsets show in the Dataset table, come back from the page into the config,
    and Validate names the subset whose folder is missing."""
    (tmp_path / "have").mkdir()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "have" / "a.png")
    (tmp_path / "d.toml").write_text(f"""
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'have'}"
  num_repeats = 3
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'gone'}"
  is_reg = true
""")
    source = tmp_path / "kohya.json"
    source.write_text(json.dumps({**KOHYA_FALLBACK, "dataset_config": str(tmp_path / "d.toml"), "pretrained_model_name_or_path": "demo/model",
                                  "sdxl": False}))
    with page.expect_file_chooser() as chooser:
        page.click("#btn-kohya-import")
    chooser.value.set_files(str(source))
    wait_until(lambda: "Imported kohya_ss config" in text_of(page, "#preset-status"), 30)
    page.locator("#sec-Dataset .lathe-advanced").get_by_text("Advanced").first.click()  # the table is folded away
    table = field(page, "dataset.subsets")
    table.wait_for(state="visible")
    wait_until(lambda: str(tmp_path / "gone") in table.inner_text(), 20, what="the subsets in the table")
    assert str(tmp_path / "have") in table.inner_text()
    page.click("#btn-validate")
    dataset = page.locator("#err-Dataset")
    dataset.wait_for(state="visible")
    assert f"More subsets: folder {tmp_path / 'gone'} does not exist" in dataset.inner_text()
    assert str(tmp_path / "have") not in dataset.inner_text()


def test_import_a_kohya_config_shows_what_was_not_imported(page, tmp_path):
    source = KOHYA
    if not source.is_file():
        source = tmp_path / "kohya.json"
        source.write_text(json.dumps(KOHYA_FALLBACK))
    with page.expect_file_chooser() as chooser:
        page.click("#btn-kohya-import")
    chooser.value.set_files(str(source))
    status = page.locator("#preset-status")
    wait_until(lambda: "Imported kohya_ss config" in status.inner_text(), 30)
    report = page.locator("#kohya-report textarea").input_value()
    assert "Not supported (" in report and "Not needed (" in report and "block_alphas" in report
    assert field(page, "network.lora.rank").locator("input").input_value() == "64"
    assert "Network › Rank (network_dim): 4 → 64" in status.inner_text()
    shot(page, tmp_path, "kohya-import", "#presets")
    page.click("#btn-preset-load")  # back to the demo preset: every field is set again
    wait_until(lambda: "Loaded preset demo" in status.inner_text(), 30)
    assert "Rank (network_dim): 64 → 4" in status.inner_text()
    assert field(page, "network.lora.rank").locator("input").input_value() == "4"


def test_train_with_prodigy_watch_it_live_and_see_rotation(page, server, tmp_path):
    choose(page, "f-optimizer-type", "Prodigy")
    d_coef = field(page, "optimizer.Prodigy.d_coef")
    d_coef.wait_for(state="visible")
    fill(page, "optimizer.Prodigy.d_coef", 0.8)
    page.evaluate("document.activeElement.blur()")
    shot(page, tmp_path, "setup-prodigy", "#sec-Optimizer")
    fill(page, "training.max_train_epochs", 3)
    fill(page, "saving.save_last_n_epochs", 1)
    wait_until(lambda: "epoch 3, plus final" in text_of(page, "#saving-preview"), 20)
    page.click("#btn-start-setup")
    page.locator("#run-banner .lathe-banner").wait_for()
    seen = watch_to(page, ("finished", "failed", "stopped"))
    state, step, total = seen[-1]
    assert (state, step, total) == ("finished", 48, 48), seen
    assert any(0 < s < 48 and st == "running" for st, s, _ in seen), f"no live progress was shown: {seen}"
    assert "all 48 steps done" in text_of(page, "#run-banner")

    v = versions(server)[-1]
    cfg = json.loads((v / "config.json").read_text())
    assert cfg["optimizer"]["type"] == "Prodigy" and cfg["optimizer"]["d_coef"] == 0.8
    assert cfg["saving"]["save_last_n_epochs"] == 1 and cfg["training"]["max_train_epochs"] == 3
    # The curves (loss, learning rate, Prodigy's d) and a sample image arrived while it ran.
    assert "step 48/48 · epoch 3/3 · loss " in text_of(page, "#run-progress")
    for plot in ("#plot-loss", "#plot-lr", "#plot-d"):  # each curve is drawn, in its series colour
        wait_until(lambda p=plot: page.locator(f"{p} svg path[stroke='#4f46e5'], {p} svg path[stroke='#db2777']").count(),
                   20, what=f"a curve in {plot}")
    wait_until(lambda: page.locator("#run-samples img").count() >= 1, 20, what="a sample image")
    activity = page.locator("#run-activity textarea").input_value()
    assert "removed checkpoint epoch-000001" in activity and "removed checkpoint epoch-000002" in activity
    assert f"python -m backend train {v / 'config.json'}" in box(page, "#run-reproduce")
    shot(page, tmp_path, "run")

    tab(page, "Checkpoints")
    table = page.locator("#ckpt-table")
    wait_until(lambda: "final" in table.inner_text() and "epoch-000003" in table.inner_text(), 30)
    assert "epoch-000001" not in table.inner_text() and "epoch-000002" not in table.inner_text()
    assert sorted(p.name for p in (v / "checkpoints").iterdir()) == ["epoch-000003", "final"]
    choose(page, "ckpt-choice", "final (valid)")
    page.click("#btn-export-path")
    assert page.locator("#ckpt-export-path input, #ckpt-export-path textarea").first.input_value() == str(
        v / "exports" / "demo.safetensors")
    page.click("#btn-verify")  # deep verification runs in a subprocess (the GUI never imports torch)
    wait_until(lambda: "Valid" in text_of(page, "#ckpt-result"), 120, what="the verification result")
    assert "VALID:" in text_of(page, "#ckpt-result")
    shot(page, tmp_path, "checkpoints")
    choose(page, "ckpt-choice", "epoch-000003 (valid)")
    page.click("#btn-ckpt-delete")
    page.click("#btn-ckpt-delete-now")  # a second, explicit confirmation
    wait_until(lambda: "Deleted checkpoint" in text_of(page, "#ckpt-result"), 30)
    assert not (v / "checkpoints" / "epoch-000003").exists() and not (v / "exports" / "demo-000003.safetensors").exists()
    wait_until(lambda: "epoch-000003" not in table.inner_text(), 20)

    tab(page, "Samples")
    grid = page.locator("#samples-all")
    wait_until(lambda: grid.locator(".lathe-sp").count() == 2, 30, what="two save points with samples")
    assert [t.split("\n")[0] for t in grid.locator(".lathe-sp-title").all_inner_texts()] == ["epoch 2", "final"]
    assert "a yellow star" in grid.inner_text()
    assert http_status(server.url + grid.locator("img").first.get_attribute("src").lstrip("/")) == 200
    wait_until(lambda: page.locator("#samples-left img").count() == 2 and page.locator("#samples-right img").count() == 2,
               20, what="the side-by-side comparison")
    shot(page, tmp_path, "samples")
    assert page.external == []  # plots, images and fonts all came from the app


def finished_version(page, server) -> Path:
    """A finished run of the output folder (the Prodigy test's when it ran first), else one trained here."""
    from backend.runs import read_status

    done = [v for v in versions(server) if read_status(v).get("state") == "finished"]
    if done:
        return done[-1]
    fill(page, "training.max_train_epochs", 1)
    page.click("#btn-start-setup")
    page.locator("#run-banner .lathe-banner").wait_for()
    assert watch_to(page, ("finished", "failed", "stopped"))[-1][0] == "finished"
    open_app(page, server)
    return versions(server)[-1]


def test_load_a_runs_settings_and_train_a_finished_run_further(page, server, tmp_path):
    v = finished_version(page, server)
    cfg = json.loads((v / "config.json").read_text())
    epochs = cfg["training"]["max_train_epochs"]
    fill(page, "training.max_train_epochs", 77)  # Load settings replaces what Setup holds
    tab(page, "Checkpoints")
    choose(page, "ckpt-version", f"{cfg['run_name']} / {v.name} · finished")
    page.click("#btn-load-settings")
    wait_until(lambda: page.get_by_role("tab", name="Setup", exact=True).get_attribute("aria-selected") == "true", 30,
               what="the Setup tab after Load settings")
    wait_until(lambda: field(page, "training.max_train_epochs").locator("input").first.input_value() == str(epochs), 30)
    assert field(page, "optimizer.type").locator("input").first.input_value() == cfg["optimizer"]["type"]
    assert f"{v.name}" in text_of(page, "#preset-status")
    # Train further by one epoch: a resume from its last checkpoint, planned and preflighted first.
    tab(page, "Checkpoints")
    plan = page.locator("#reuse-plan")
    wait_until(lambda: f"{epochs} → {epochs + 1}" in plan.inner_text(), 30, what="the train-further plan")
    assert "training.max_train_epochs" in plan.inner_text() and "Cannot" not in plan.inner_text()
    assert f"--set training.max_train_epochs={epochs + 1}" in box(page, "#reuse-command")
    shot(page, tmp_path, "reuse", "#reuse-box")
    page.click("#btn-train-further")
    page.locator("#run-banner .lathe-banner").wait_for()
    wait_until(lambda: v.name not in text_of(page, "#run-banner"), 30, what="the new version in the Run tab")
    seen = watch_to(page, ("finished", "failed", "stopped"))
    total = (epochs + 1) * STEPS_PER_EPOCH
    assert seen[-1] == ("finished", total, total), seen
    assert all(step == 0 or step > epochs * STEPS_PER_EPOCH for _, step, _ in seen), seen
    further = versions(server)[-1]
    assert json.loads((further / "config.json").read_text())["resume_from"] == str(v / "checkpoints" / "final")


def test_reload_mid_run_reattaches_then_stop_and_resume(page, server, tmp_path):
    fill(page, "training.max_train_epochs", 50)  # the demo preset (AdamW), long enough to stop
    page.click("#btn-start-setup")
    page.locator("#run-banner .lathe-banner").wait_for()
    watch_to(page, ("running",))
    wait_until(lambda: run_state(page)[1] >= 3, 90, what="a few steps")
    v = versions(server)[-1]
    # While it runs, Stop is the highlighted button, not Start.
    wait_until(lambda: "primary" in (page.locator("#btn-stop").get_attribute("class") or ""), 20, what="Stop highlighted")
    assert "primary" not in (page.locator("#btn-start").get_attribute("class") or "")

    page.reload()  # the new page finds the running job by itself, and opens the Run tab for it
    wait_until(lambda: page.get_by_role("tab", name="Run", exact=True).get_attribute("aria-selected") == "true", 30,
               what="the Run tab opened by the reload")
    wait_until(lambda: v.name in text_of(page, "#run-banner") and run_state(page)[0] == "running", 30)
    before = run_state(page)[1]
    wait_until(lambda: run_state(page)[1] > before, 60, what="progress after the reload")
    assert "training demo" in page.locator("#run-log textarea").input_value()

    page.click("#btn-stop")
    seen = watch_to(page, ("stopped", "failed", "finished"), 120)
    assert seen[-1][0] == "stopped", seen
    assert "stopped by request" in text_of(page, "#run-banner")
    stops = [p.name for p in (v / "checkpoints").iterdir() if p.name.startswith("stop-")]
    assert len(stops) == 1 and stops[0] in page.locator("#run-activity textarea").input_value()

    # Resume from the stop checkpoint with the Setup tab's settings, shortened to end one epoch later.
    stopped_at = int(stops[0].split("-")[1])
    epochs = stopped_at // STEPS_PER_EPOCH + 1
    tab(page, "Setup")
    fill(page, "training.max_train_epochs", epochs)
    tab(page, "Checkpoints")
    wait_until(lambda: stops[0] in page.locator("#ckpt-table").inner_text(), 30)
    choose(page, "ckpt-choice", f"{stops[0]} (valid)")
    page.get_by_label("the Setup tab's settings").check()
    plan = page.locator("#resume-plan")
    wait_until(lambda: "`training.max_train_epochs`" in plan.inner_text() or "training.max_train_epochs" in plan.inner_text(), 30)
    assert f"50 → {epochs}" in plan.inner_text() and "Cannot resume" not in plan.inner_text()
    assert f"--set training.max_train_epochs={epochs}" in box(page, "#resume-command")
    shot(page, tmp_path, "resume")
    page.click("#btn-resume")
    page.locator("#run-banner .lathe-banner").wait_for()
    wait_until(lambda: "version_" in text_of(page, "#run-banner") and v.name not in text_of(page, "#run-banner"), 30)
    seen = watch_to(page, ("finished", "failed", "stopped"))
    total = epochs * STEPS_PER_EPOCH
    assert seen[-1] == ("finished", total, total), seen
    assert all(step == 0 or step > stopped_at for _, step, _ in seen), f"the resume restarted from 0: {seen}"
    resumed = versions(server)[-1]
    assert json.loads((resumed / "config.json").read_text())["resume_from"] == str(v / "checkpoints" / stops[0])
    assert (v / "checkpoints" / stops[0] / "manifest.json").is_file()  # the checkpoint resumed from is untouched
    wait_until(lambda: "python -m backend resume" in box(page, "#run-reproduce"), 10)


def test_kill_asks_first_then_ends_the_run_at_once(page, server):
    fill(page, "training.max_train_epochs", 50)
    tab(page, "Run")
    page.click("#btn-start")
    wait_until(lambda: run_state(page)[0] == "running" and run_state(page)[1] >= 1, 120, what="a running run")
    page.click("#btn-kill")
    confirm = page.locator("#kill-confirm")
    confirm.wait_for(state="visible")
    page.click("#btn-kill-cancel")
    confirm.wait_for(state="hidden")
    assert run_state(page)[0] == "running"
    page.click("#btn-kill")
    page.click("#btn-kill-now")
    seen = watch_to(page, ("stopped", "failed", "finished"), 60)
    assert seen[-1][0] == "stopped" and "killed by request" in text_of(page, "#run-banner")


def test_a_queue_of_two_runs_finishes_in_order_across_an_app_restart(browser, demo, tmp_path):
    """Two setups queued from the Queue tab start one after another; app.py is killed while the first
    runs, and the next app.py's queue worker records it and starts the second."""
    from backend.runs import read_status

    out = tmp_path / "runs"
    apps = [AppServer(demo.parent, out, tmp_path / "app-1.log")]
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        apps[0].wait_ready()
        pg = context.new_page()
        pg.set_default_timeout(30_000)
        open_app(pg, apps[0])
        tab(pg, "Queue")
        pg.click("#btn-queue-pause")  # fill the queue first, then let it go
        wait_until(lambda: "paused" in text_of(pg, "#queue-summary"), 20)
        tab(pg, "Setup")
        for name in ("first", "second"):
            fill(pg, "run_name", name)
            fill(pg, "training.max_train_epochs", 1)
            tab(pg, "Queue")
            pg.click("#btn-queue-add")
            wait_until(lambda n=name: f"Queued **{n}**" in text_of(pg, "#queue-result") or f"Queued {n}" in
                       text_of(pg, "#queue-result"), 30, what=f"{name} queued")
            tab(pg, "Setup")
        tab(pg, "Queue")
        table = pg.locator("#queue-table")
        wait_until(lambda: "first" in table.inner_text() and "second" in table.inner_text(), 20)
        pg.click("#btn-queue-resume")
        wait_until(lambda: any(out.glob("first/version_*")), 60, what="the first run started by the queue")
        first = next(out.glob("first/version_*"))
        wait_until(lambda: (read_status(first).get("step") or 0) >= 1, 90, what="the first run training")
        os.killpg(apps[0].proc.pid, signal.SIGKILL)  # app.py dies; the run goes on in its own session
        apps[0].proc.wait(timeout=30)
        assert not any(out.glob("second/version_*"))
        apps.append(AppServer(demo.parent, out, tmp_path / "app-2.log"))
        apps[1].wait_ready()
        wait_until(lambda: read_status(first).get("state") == "finished", RUN_TIMEOUT, what="the first run's end")
        wait_until(lambda: any(out.glob("second/version_*")), 60, what="the second run started by the new app.py")
        second = next(out.glob("second/version_*"))
        wait_until(lambda: read_status(second).get("state") in ("finished", "failed", "stopped"), RUN_TIMEOUT)
        assert read_status(second).get("state") == "finished", read_status(second)
        assert read_status(second)["started_at"] >= read_status(first)["finished_at"]
        pg = context.new_page()
        open_app(pg, apps[1])
        tab(pg, "Queue")
        wait_until(lambda: pg.locator("#queue-table").inner_text().count("done") == 2, 30, what="both entries done")
        shot(pg, tmp_path, "queue")
    finally:
        context.close()
        for app in reversed(apps):
            app.stop()


def test_the_dataset_tab_counts_buckets_warns_and_saves_a_caption(page, tmp_path):
    tab(page, "Dataset")
    page.click("#btn-dataset-show")
    totals = page.locator("#dataset-totals")
    wait_until(lambda: "64 samples per epoch" in totals.inner_text(), 60, what="the demo's summary")
    assert "14 images x repeats = 64 samples per epoch" in totals.inner_text()
    assert "16 steps per epoch" in totals.inner_text()  # the demo preset's batch of 4
    subsets = page.locator("#dataset-subsets").inner_text()
    assert "5_shape" in subsets and "2_yellow star" in subsets
    assert "64 x 64\n14\n64" in page.locator("#dataset-buckets").inner_text()  # the demo: one 64 px bucket
    wait_until(lambda: page.locator("#dataset-gallery img").count() == 14, 30, what="the demo's thumbnails")

    # A folder of your own, pointed at one repeats folder itself: the warning says what was meant.
    mine = tmp_path / "mydata" / "10_thing"
    mine.mkdir(parents=True)
    for i, size in enumerate([(64, 64), (96, 48), (48, 96)]):
        Image.new("RGB", size, (40 * i, 90, 160)).save(mine / f"img_{i}.png")
        (mine / f"img_{i}.txt").write_text(f"thing, pose {i}")
    tab(page, "Setup")
    fill(page, "dataset.train_data_dir", mine)
    tab(page, "Dataset")
    page.click("#btn-dataset-show")
    wait_until(lambda: "looks like a repeats folder" in totals.inner_text(), 60, what="the repeats-folder warning")
    assert f"did you mean its parent {mine.parent}" in totals.inner_text() or str(mine.parent) in totals.inner_text()
    tab(page, "Setup")
    fill(page, "dataset.train_data_dir", mine.parent)
    tab(page, "Dataset")
    page.click("#btn-dataset-show")
    wait_until(lambda: "3 images x repeats = 30 samples per epoch" in totals.inner_text(), 60, what="the new counts")
    wait_until(lambda: page.locator("#dataset-gallery img").count() == 3, 30)
    page.locator("#dataset-gallery img").first.click()
    caption = page.locator("#dataset-caption textarea")
    wait_until(lambda: caption.input_value() == "thing, pose 0", 20, what="the caption in the editor")
    caption.fill("thing, pose 0, edited in Lathe")
    page.click("#btn-caption-save")
    wait_until(lambda: "Saved" in text_of(page, "#dataset-result"), 20)
    assert (mine / "img_0.txt").read_text() == "thing, pose 0, edited in Lathe"
    backups = list((mine / ".lathe-caption-backups").iterdir())
    assert len(backups) == 1 and backups[0].read_text() == "thing, pose 0"
    shot(page, tmp_path, "dataset")


def test_tensorboard_opens_from_the_run_tab_and_answers(page, server, tmp_path):
    tab(page, "Run")
    page.locator("#tensorboard-box").get_by_text("TensorBoard").first.click()  # unfold it
    page.get_by_label("every run in the output folder").check()
    page.click("#btn-tensorboard")
    link = page.locator("#tb-link a")
    wait_until(lambda: link.count() == 1, 90, what="the TensorBoard link")
    url = link.get_attribute("href")
    assert url.startswith("http://127.0.0.1:") and http_status(url) == 200
    shot(page, tmp_path, "tensorboard", "#tensorboard-box")
