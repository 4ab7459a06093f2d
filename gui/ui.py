"""Assemble the Lathe GUI: the tabs, and the few events that cross tabs (Start from Setup lands on
Run; Resume from Checkpoints lands on Run). Building the UI starts nothing and imports no torch."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry, no version check

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402

from gui.page import Page  # noqa: E402
from gui.tabs import checkpoints, run, samples, setup  # noqa: E402

TITLE = "Lathe"
CSS_FILE = Path(__file__).with_name("style.css")


def theme() -> gr.themes.Base:
    """Gradio's default look with system fonts only: the page fetches nothing from the internet."""
    sans = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
    mono = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
    return gr.themes.Default(primary_hue="indigo", font=sans, font_mono=mono)


def build_ui(output_dir: str | Path) -> tuple[gr.Blocks, Page]:
    """The Blocks app over `output_dir` (and the Page holding its shared state)."""
    page = Page.create(output_dir)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as blocks:
        gr.Markdown(f"# {TITLE}\nTrain Stable Diffusion LoRAs: set up, start, watch, resume. "
                    f"Runs are kept in `{page.output_dir}`.", elem_id="lathe-header")
        with gr.Tabs(selected="setup", elem_id="lathe-tabs") as tabs:
            page.share("tabs", tabs)
            setup.build(page)
            run_tab = run.build(page)
            ckpt_tab = checkpoints.build(page, run_tab)
            samples_tab, samples_gr_tab = samples.build(page)
        run_tab.build_hidden()
        ckpt_tab.build_hidden()
        run_tab.wire(blocks)
        ckpt_tab.wire(blocks)
        samples_tab.wire(blocks, samples_gr_tab)
    return blocks, page


def launch_kwargs(page: Page) -> dict[str, Any]:
    """What launch() needs besides host, port and auth: no share link, only the output folder served."""
    return {
        "share": False,
        "allowed_paths": [str(page.output_dir)],
        "ssr_mode": False,
        "theme": theme(),
        "css_paths": [CSS_FILE],
        "max_file_size": "10mb",
        "show_error": True,
        "footer_links": ["gradio", "settings"],
    }
