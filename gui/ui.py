"""Assemble the Lathe GUI: the tabs, and the few events that cross tabs (Start from Setup lands on
Run; Resume from Checkpoints lands on Run). Building the UI starts nothing and imports no torch."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry, no version check

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402

from gui.page import Page  # noqa: E402
from gui.security import LOOPBACK_HOSTS, HostCheck, LoginPageFilter, LoginThrottle  # noqa: E402
from gui.tabs import checkpoints, dataset, presets, queue, run, samples, setup  # noqa: E402

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
    # delete_cache: Gradio's copies of shown and uploaded files older than a day go, hourly.
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as blocks:
        gr.Markdown(f"# {TITLE}\nTrain Stable Diffusion LoRAs: set up, start, watch, resume. "
                    f"Runs are kept in `{page.output_dir}`.", elem_id="lathe-header")
        with gr.Tabs(selected="setup", elem_id="lathe-tabs") as tabs:
            page.share("tabs", tabs)
            setup.build(page)
            dataset_tab = dataset.build(page)
            run_tab = run.build(page)
            ckpt_tab = checkpoints.build(page, run_tab)
            samples_tab, samples_gr_tab = samples.build(page)
            queue_tab = queue.build(page)
        page.tabs.update(run=run_tab, checkpoints=ckpt_tab, samples=samples_tab, queue=queue_tab, dataset=dataset_tab)
        run_tab.build_hidden()
        ckpt_tab.build_hidden()
        presets.wire_page_load(page.tabs["presets"], blocks)
        run_tab.wire(blocks)
        ckpt_tab.wire(blocks)
        samples_tab.wire(blocks, samples_gr_tab)
        queue_tab.wire(blocks)
        dataset_tab.wire()
    return blocks, page


def launch_kwargs(page: Page, hosts: tuple[str, ...] | None = LOOPBACK_HOSTS) -> dict[str, Any]:
    """What launch() needs besides host, port and auth: no share link, only the output folder served,
    logins throttled, and only requests addressed to `hosts` answered (None: any)."""
    middleware = [Middleware(HostCheck, allowed=hosts), Middleware(LoginThrottle), Middleware(LoginPageFilter)]
    return {
        "share": False,
        "allowed_paths": [str(page.output_dir)],
        # openapi_url None: FastAPI's own /openapi.json would answer without the login (Gradio's
        # /gradio_api/openapi.json asks for it).
        "app_kwargs": {"middleware": middleware, "openapi_url": None},
        "ssr_mode": False,
        "theme": theme(),
        "css_paths": [CSS_FILE],
        "max_file_size": "10mb",
        "show_error": True,
        "footer_links": ["gradio", "settings"],
    }
