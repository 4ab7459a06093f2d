"""The Dataset tab: the dataset the Setup tab names, as training will use it (backend.dataset_view,
torch-free): its subsets with repeats and caption counts, images x repeats = samples and the steps
per epoch at the chosen batch, the buckets, the most frequent tags, warnings; thumbnails with their
captions, a page at a time; and a caption editor that saves atomically with a backup of the text it
replaced (backend.captions). Images are read only from inside the dataset folders the setup names;
captions are written only there."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from backend.captions import PathRefused, save_caption
from backend.config import TrainingConfig
from backend.dataset_view import UnreadableImage, page, summarize, thumbnail
from gui.form import FormError, form_to_config
from gui.page import Page

PER_PAGE = 24
SUBSET_HEADERS = ["#", "Folder", "Repeats", "Regularization", "Images", "Captioned", "No caption", "Unreadable",
                  "Samples per epoch"]
BUCKET_HEADERS = ["Bucket (w x h)", "Images", "Samples per epoch"]


def subset_rows(summary: Any) -> pd.DataFrame:
    rows = [[s.index, s.folder, s.repeats, "yes" if s.is_reg else "", s.images, s.captioned, s.uncaptioned,
             len(s.unreadable), s.samples] for s in summary.subsets]
    return pd.DataFrame(rows, columns=SUBSET_HEADERS)


def bucket_rows(summary: Any) -> pd.DataFrame:
    rows = [[f"{b['bucket'][0]} x {b['bucket'][1]}", b["images"], b["samples"]] for b in summary.buckets]
    return pd.DataFrame(rows, columns=BUCKET_HEADERS)


def totals_text(summary: Any, cfg: TrainingConfig) -> str:
    reg = f" + {summary.reg_images} regularization images" if summary.reg_images else ""
    held = f" ({summary.validation_images} held out for validation)" if summary.validation_images else ""
    t = cfg.training
    batch = (f"batch {t.train_batch_size} x {cfg.launch.num_processes} process(es) x {t.gradient_accumulation_steps} "
             f"accumulation = {summary.global_batch}")
    lines = [f"**{summary.images} images{reg}{held} x repeats = {summary.samples_per_epoch} samples per epoch**; "
             f"at {batch}: **{summary.steps_per_epoch} steps per epoch**, {summary.total_steps} steps in "
             f"{summary.total_epochs} epoch(s)."]
    if summary.top_tags:
        lines.append("Most frequent tags: " + ", ".join(f"{tag} ({n})" for tag, n in summary.top_tags[:20]) + ".")
    lines += [f"- ✖ {e}" for e in summary.errors] + [f"- ⚠ {w}" for w in summary.warnings]
    return "\n\n".join(lines[:2]) + ("\n\n" + "\n".join(lines[2:]) if lines[2:] else "")


class DatasetTab:
    def __init__(self, page: Page):
        self.page = page
        self.c: dict[str, Any] = {}

    def build(self) -> None:
        c = self.c
        with gr.Tab("Dataset", id="dataset", elem_id="tab-dataset") as tab:
            self.page.tab_items["dataset"] = tab
            with gr.Row(equal_height=True):
                c["show"] = gr.Button("Show the Setup tab's dataset", variant="primary", elem_id="btn-dataset-show")
                c["prev"] = gr.Button("Previous page", elem_id="btn-dataset-prev")
                c["next"] = gr.Button("Next page", elem_id="btn-dataset-next")
            c["totals"] = gr.Markdown("Press the button to read the dataset the Setup tab names.", elem_id="dataset-totals")
            c["subsets"] = gr.Dataframe(pd.DataFrame([], columns=SUBSET_HEADERS), interactive=False,
                                        elem_id="dataset-subsets", label="Subsets", wrap=True)
            c["buckets"] = gr.Dataframe(pd.DataFrame([], columns=BUCKET_HEADERS), interactive=False,
                                        elem_id="dataset-buckets", label="Buckets", max_height=240)
            c["where"] = gr.Markdown("", elem_id="dataset-page")
            c["gallery"] = gr.Gallery(label="Images and their captions (click one to edit its caption)", columns=6,
                                      height=420, object_fit="contain", elem_id="dataset-gallery", allow_preview=False)
            with gr.Row(equal_height=True):
                c["image"] = gr.Textbox(label="Image", interactive=False, elem_id="dataset-image", scale=1)
                c["caption"] = gr.Textbox(label="Caption", lines=3, elem_id="dataset-caption", scale=3)
                c["save"] = gr.Button("Save caption", elem_id="btn-caption-save", scale=1, interactive=False)
            c["result"] = gr.Markdown("", elem_id="dataset-result")
            c["state"] = gr.State({"offset": 0, "ids": []})

    def _config(self, data: dict) -> TrainingConfig:
        return form_to_config(self.page.form.values(data))

    def _page(self, cfg: TrainingConfig, offset: int) -> dict:
        c = self.c
        entries = page(cfg, offset, PER_PAGE)
        items = []
        for e in entries:
            try:
                img = Image.open(io.BytesIO(thumbnail(cfg, e.id)))
            except (UnreadableImage, PathRefused, OSError) as err:
                img = Image.new("RGB", (64, 64), (200, 200, 200))
                e = dataclasses.replace(e, caption=f"(unreadable: {err})")
            items.append((img, f"{e.path}: {e.caption}"))
        shown = f"Images {offset + 1}-{offset + len(entries)}" if entries else "No images on this page"
        return {c["gallery"]: items, c["where"]: shown, c["state"]: {"offset": offset, "ids": [e.id for e in entries],
                                                                     "captions": [e.caption for e in entries]},
                c["image"]: "", c["caption"]: "", c["save"]: gr.update(interactive=False)}

    def on_show(self, data: dict) -> dict:
        c = self.c
        try:
            cfg = self._config(data)
        except FormError as e:
            return {c["totals"]: f"✖ The Setup tab's settings have {len(e.errors)} problem(s): press Validate there."}
        return {**self._page(cfg, 0), c["totals"]: "Reading the dataset..."}

    def on_summary(self, data: dict) -> dict:
        c = self.c
        try:
            cfg = self._config(data)
        except FormError:
            return {}
        summary = summarize(cfg)
        return {c["totals"]: totals_text(summary, cfg), c["subsets"]: subset_rows(summary),
                c["buckets"]: bucket_rows(summary)}

    def on_turn(self, data: dict, step: int) -> dict:
        state = data.get(self.c["state"]) or {}
        try:
            cfg = self._config(data)
        except FormError:
            return {}
        offset = max(0, int(state.get("offset", 0)) + step * PER_PAGE)
        if step > 0 and len(state.get("ids", [])) < PER_PAGE:
            offset = int(state.get("offset", 0))  # the last page: stay
        return self._page(cfg, offset)

    def on_pick(self, data: dict, evt: gr.SelectData) -> dict:
        c, state = self.c, data.get(self.c["state"]) or {}
        ids, captions = state.get("ids", []), state.get("captions", [])
        i = evt.index if isinstance(evt.index, int) else (evt.index or [0])[0]
        if not 0 <= i < len(ids):
            return {}
        return {c["image"]: ids[i], c["caption"]: captions[i], c["save"]: gr.update(interactive=True)}

    def on_save(self, data: dict) -> dict:
        c = self.c
        image, text = data.get(c["image"]) or "", data.get(c["caption"]) or ""
        try:
            cfg = self._config(data)
            path = save_caption(cfg, image, text)
        except FormError as e:
            return {c["result"]: f"✖ Not saved: the Setup tab's settings have {len(e.errors)} problem(s)."}
        except (PathRefused, OSError) as e:
            return {c["result"]: f"✖ Not saved: {e}"}
        state = dict(data.get(c["state"]) or {})
        if image in state.get("ids", []):
            captions = list(state.get("captions", []))
            captions[state["ids"].index(image)] = text
            state["captions"] = captions
        return {c["result"]: f"✔ Saved {path} (the text it replaced is kept in {path.parent / '.lathe-caption-backups'})",
                c["state"]: state}

    def wire(self) -> None:
        c, form = self.c, self.page.form
        picks = form.inputs | {c["state"]}
        shown = [c["gallery"], c["where"], c["state"], c["image"], c["caption"], c["save"]]
        c["show"].click(self.on_show, inputs=picks, outputs=[*shown, c["totals"]]).then(
            self.on_summary, inputs=picks, outputs=[c["totals"], c["subsets"], c["buckets"]])
        c["prev"].click(lambda data: self.on_turn(data, -1), inputs=picks, outputs=shown)
        c["next"].click(lambda data: self.on_turn(data, 1), inputs=picks, outputs=shown)
        c["gallery"].select(self.on_pick, inputs={c["state"]}, outputs=[c["image"], c["caption"], c["save"]])
        c["save"].click(self.on_save, inputs=form.inputs | {c["image"], c["caption"], c["state"]},
                        outputs=[c["result"], c["state"]])


def build(page: Page) -> DatasetTab:
    tab = DatasetTab(page)
    tab.build()
    return tab
