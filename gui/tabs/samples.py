"""The Samples tab: the sample images of a version, one gallery row per save point with the prompts
as captions, and two save points side by side."""

from __future__ import annotations

from typing import Any

import gradio as gr

from gui.page import Page, dropdown_update, version_choices
from gui.samples import SavePointSamples, grid_html, save_points


class SamplesTab:
    def __init__(self, page: Page):
        self.page = page
        self.c: dict[str, Any] = {}

    def build(self) -> gr.Tab:
        c = self.c
        with gr.Tab("Samples", id="samples", elem_id="tab-samples") as tab:
            self.page.tab_items["samples"] = tab
            with gr.Row(equal_height=True):
                c["version"] = gr.Dropdown([], label="Version", elem_id="samples-version", scale=4, interactive=True)
                c["refresh"] = gr.Button("Refresh", elem_id="btn-samples-refresh", scale=1)
            c["info"] = gr.Markdown("", elem_id="samples-info")
            c["all"] = gr.HTML(grid_html([]), elem_id="samples-all")
            gr.Markdown("### Compare two save points")
            with gr.Row():
                with gr.Column():
                    c["a"] = gr.Dropdown([], label="Left", elem_id="samples-a", interactive=True)
                    c["ga"] = gr.Gallery(label="Left", columns=2, elem_id="samples-left", object_fit="contain",
                                         height=320)
                with gr.Column():
                    c["b"] = gr.Dropdown([], label="Right", elem_id="samples-b", interactive=True)
                    c["gb"] = gr.Gallery(label="Right", columns=2, elem_id="samples-right", object_fit="contain",
                                         height=320)
        return tab

    def _points(self, version: str | None) -> list[SavePointSamples]:
        version = self.page.inside(version)
        return save_points(version) if version else []

    def draw(self, version: str | None, left: str | None = None, right: str | None = None) -> dict:
        c = self.c
        points = self._points(version)
        labels = [(p.title, p.label) for p in points]
        prompts = max((len(p.images) for p in points), default=1)
        known = [p.label for p in points]
        left = left if left in known else (known[0] if known else None)
        right = right if right in known else (known[-1] if known else None)
        info = (f"{len(points)} save point{'s' if len(points) != 1 else ''} with samples."
                if points else "No samples in this version yet (set sampling prompts and a sampling interval in Setup).")
        return {
            c["info"]: info,
            c["all"]: grid_html(points),
            c["a"]: gr.update(choices=labels, value=left), c["b"]: gr.update(choices=labels, value=right),
            c["ga"]: gr.update(value=self._one(points, left), columns=max(1, min(prompts, 3))),
            c["gb"]: gr.update(value=self._one(points, right), columns=max(1, min(prompts, 3))),
        }

    @staticmethod
    def _one(points: list[SavePointSamples], label: str | None) -> list[tuple[str, str]]:
        return [(path, prompt) for p in points if p.label == label for path, prompt in p.images]

    def on_refresh(self, data: dict) -> dict:
        c = self.c
        choices = version_choices(self.page.list_runs(fresh=True))
        wanted = data.get(c["version"])
        version = wanted if wanted in {v for _, v in choices} else (choices[0][1] if choices else None)
        return {c["version"]: dropdown_update(choices, version),
                **self.draw(version, data.get(c["a"]), data.get(c["b"]))}

    def on_version(self, data: dict) -> dict:
        return self.draw(data.get(self.c["version"]))

    def on_pick(self, data: dict) -> dict:
        c = self.c
        points = self._points(data.get(c["version"]))
        return {c["ga"]: self._one(points, data.get(c["a"])), c["gb"]: self._one(points, data.get(c["b"]))}

    def wire(self, blocks: gr.Blocks, tab: gr.Tab) -> None:
        c = self.c
        picks = {c["version"], c["a"], c["b"]}
        outs = [c["version"], c["info"], c["all"], c["a"], c["b"], c["ga"], c["gb"]]
        tab.select(self.on_refresh, inputs=picks, outputs=outs, show_progress="hidden")
        c["refresh"].click(self.on_refresh, inputs=picks, outputs=outs)
        c["version"].input(self.on_version, inputs={c["version"]}, outputs=outs[1:])
        gr.on([c["a"].input, c["b"].input], self.on_pick, inputs=picks, outputs=[c["ga"], c["gb"]])


def build(page: Page) -> tuple[SamplesTab, gr.Tab]:
    tab = SamplesTab(page)
    return tab, tab.build()
