"""Sample images of a version, grouped by save point, with their prompts (pure file reading).

Images live in <version>/samples/<save point>/<index>.png; the prompt of each comes from its
`sample_saved` event, else from the version's config (sampling.prompts[index]).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from backend.checkpoints import parse_state_name
from backend.events import read_events

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class SavePointSamples:
    label: str  # folder name: epoch-000002, step-00000100, final
    title: str  # 'epoch 2', 'step 100', 'final'
    step: int | None
    images: tuple[tuple[str, str], ...]  # (path, prompt)


def title_of(label: str) -> str:
    parsed = parse_state_name(label)
    if parsed is None:
        return label
    kind, number = parsed
    return kind if number is None else f"{kind} {number}"


def _config_prompts(version_dir: Path) -> list[str]:
    try:
        data = json.loads((version_dir / "config.json").read_text(encoding="utf-8"))
        return list(data.get("sampling", {}).get("prompts") or [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return []


def save_points(version_dir: str | Path) -> list[SavePointSamples]:
    """Every save point with samples, in training order (final last)."""
    v = Path(version_dir)
    root = v / "samples"
    if not root.is_dir():
        return []
    events, _ = read_events(v / "events.jsonl")
    known = {str(Path(e["path"])): e for e in events if e.get("event") == "sample_saved" and e.get("path")}
    prompts = _config_prompts(v)
    out = []
    for folder in (p for p in root.iterdir() if p.is_dir()):
        images, step = [], None
        files = sorted((f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTS),
                       key=lambda f: (int(f.stem) if f.stem.isdigit() else 1 << 30, f.name))
        for f in files:
            ev = known.get(str(f), {})
            step = ev.get("step", step)
            index = int(f.stem) if f.stem.isdigit() else -1
            prompt = ev.get("prompt") or (prompts[index] if 0 <= index < len(prompts) else "")
            images.append((str(f), str(prompt)))
        if images:
            out.append(SavePointSamples(folder.name, title_of(folder.name), step, tuple(images)))
    final_last = {"final": 2, "best": 1}
    return sorted(out, key=lambda s: (final_last.get(s.label, 0), s.step if s.step is not None else 0, s.label))


FILE_ROUTE = "/gradio_api/file="  # Gradio serves files under the allowed paths (the output folder) here


def grid_html(points: list[SavePointSamples]) -> str:
    """One row per save point (its title, then its images with their prompts as captions)."""
    if not points:
        return '<div class="lathe-samples-empty">No samples yet.</div>'
    rows = []
    for p in points:
        step = f"<small>step {p.step}</small>" if p.step is not None else ""
        figures = "".join(
            f'<figure><img src="{FILE_ROUTE}{quote(path)}" alt="{html.escape(prompt)}" loading="lazy">'
            f"<figcaption>{html.escape(prompt)}</figcaption></figure>" for path, prompt in p.images)
        rows.append(f'<div class="lathe-sp" data-label="{html.escape(p.label)}"><div class="lathe-sp-title">'
                    f"{html.escape(p.title)}{step}</div><div class=\"lathe-sp-images\">{figures}</div></div>")
    return '<div class="lathe-samples">' + "".join(rows) + "</div>"
