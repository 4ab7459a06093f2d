"""The Run tab's TensorBoard card: start TensorBoard (backend.tensorboard_server, on 127.0.0.1) over
the shown run or over every run in the output folder, and link to it. One TensorBoard per app,
stopped when the app exits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from backend.tensorboard_server import TensorBoardError, TensorBoardServer
from gui.page import Page

SCOPES = [("the shown run", "run"), ("every run in the output folder", "all")]


class TensorBoardCard:
    def __init__(self, page: Page, choice: Any):
        self.page, self.choice = page, choice
        self.server = TensorBoardServer(log_file=page.output_dir / ".tensorboard.log")
        self.c: dict[str, Any] = {}

    def build(self) -> None:
        c = self.c
        with gr.Accordion("TensorBoard", open=False, elem_id="tensorboard-box"):
            with gr.Row(equal_height=True):
                c["scope"] = gr.Radio(SCOPES, value="run", label="Show", elem_id="tb-scope", scale=3)
                c["open"] = gr.Button("Open TensorBoard", elem_id="btn-tensorboard", scale=1)
            c["link"] = gr.Markdown("", elem_id="tb-link")

    def logdir(self, data: dict) -> Path:
        if data.get(self.c["scope"]) == "all":
            return self.page.output_dir
        version = self.page.inside(data.get(self.choice))
        if not version:
            raise TensorBoardError("no run is shown: pick one in “Showing run”, or show every run")
        folder = Path(version) / "tensorboard"
        if not folder.is_dir():
            raise TensorBoardError(f"{Path(version).parent.name} / {Path(version).name} has no TensorBoard logs "
                                   "(logging.tensorboard was off)")
        return folder

    def on_open(self, data: dict) -> dict:
        try:
            served = self.server.serve(self.logdir(data))
        except TensorBoardError as e:
            return {self.c["link"]: f"✖ {e}."}
        where = "every run" if served.logdir == self.page.output_dir else f"`{served.logdir.parent.name}`"
        return {self.c["link"]: f"TensorBoard for {where}: [{served.url}]({served.url}) (opens on this machine; it "
                                "stops when the app stops)"}

    def wire(self) -> None:
        self.c["open"].click(self.on_open, inputs={self.c["scope"], self.choice}, outputs=[self.c["link"]])
