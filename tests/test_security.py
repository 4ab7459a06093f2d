"""Security, proven over HTTP and on the code (docs/security.md is the threat model):

- app.py refuses to bind beyond loopback without a login; with --auth nothing but the login page
  and Gradio's static frontend answers without logging in;
- failed logins are throttled per client address (429 + Retry-After, doubling waits);
- the file-serving routes (every route the running app has that takes a path) serve files of the
  output folder only: no /etc/passwd, traversal, encoded traversal, symlink, repo file or demo asset;
- requests addressed to a foreign Host name are refused (DNS rebinding);
- names (presets, runs) and browser-sent paths cannot leave their folders;
- no subprocess runs through a shell;
- secrets never land in presets or in a real run's files.
"""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import ENV, ROOT
from tests.gui_helpers import (
    app_routes,
    cookie_of,
    free_port,
    login,
    request,
    start_app,
    stop_app,
    wait_until,
)

USER, PASSWORD = "ann", "correct horse"
MARK = "LATHE-OUTSIDE-SECRET-7f3a"  # the content of a file that must never be served


# ------------------------------------------------------------------------------------ app.py as a process
def test_beyond_loopback_without_a_login_exits_with_a_clear_message(tmp_path):
    port = free_port()
    out = subprocess.run([sys.executable, str(ROOT / "app.py"), "--host", "0.0.0.0", "--port", str(port),
                          "--output-dir", str(tmp_path / "runs")], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a login" in out.stderr and "--auth" in out.stderr
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "nothing may listen after the refusal"


def test_with_auth_everything_needs_the_login_and_guessing_is_throttled(tmp_path):
    port, out = free_port(), tmp_path / "runs"
    sample = out / "lora" / "version_0" / "samples" / "step-1" / "0.png"
    sample.parent.mkdir(parents=True)
    sample.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    env = {"LATHE_LOGIN_FREE_TRIES": "2", "LATHE_LOGIN_DELAY_S": "1", "LATHE_LOGIN_MAX_DELAY_S": "2"}
    proc = start_app(["--host", "0.0.0.0", "--port", str(port), "--auth", f"{USER}:{PASSWORD}"], out,
                     tmp_path / "app.log", env)
    try:
        wait_until(lambda: proc.poll() is not None or _answers(port), 120, 0.3, "app.py answering")
        assert proc.poll() is None, (tmp_path / "app.log").read_text()[-2000:]
        _refused_without_login(port, sample)
        _throttled(port)
    finally:
        stop_app(proc)


def _answers(port: int) -> bool:
    try:
        return request(port, "GET", "/")[0] == 200
    except OSError:
        return False


def _refused_without_login(port: int, sample: Path) -> None:
    status, _, body = request(port, "GET", "/")
    assert status == 200 and b"Start training" not in body and b"lathe-header" not in body  # the login page only
    assert b"Image folder" not in body and str(sample.parents[3]).encode() not in body  # nor the API description
    for path in ("/config", "/gradio_api/info", f"/gradio_api/file={sample}", "/gradio_api/upload_progress?upload_id=x"):
        assert request(port, "GET", path)[0] == 401, path
    upload = (b"--B\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.json\"\r\n\r\n{}\r\n--B--\r\n")
    assert request(port, "POST", "/gradio_api/upload", upload, {"Content-Type": "multipart/form-data; boundary=B"})[0] == 401
    join = json.dumps({"data": [], "fn_index": 0, "session_hash": "abc", "event_data": None, "trigger_id": None}).encode()
    assert request(port, "POST", "/gradio_api/queue/join", join, {"Content-Type": "application/json"})[0] == 401


def _throttled(port: int) -> None:
    """2 free failures, then waits of 1 s, 2 s, 2 s (the cap here). A guess made while waiting is never checked."""
    began = time.monotonic()
    statuses = [login(port, USER, "wrong")[0] for _ in range(2)]
    assert statuses == [400, 400]
    status, headers, _ = login(port, USER, PASSWORD)  # the right password, too early: still refused
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert login(port, USER, "wrong", source="127.0.0.2")[0] == 400  # another client address is not held back
    for owed in (2, 2):  # wait as told, fail again: the wait doubles, up to its cap
        time.sleep(float(headers["retry-after"]))
        assert login(port, USER, "wrong")[0] == 400
        status, headers, _ = login(port, USER, "wrong")
        assert status == 429 and int(headers["retry-after"]) == owed
    assert time.monotonic() - began >= 1 + 2, "4 wrong guesses took less than the waits they owe"
    time.sleep(float(headers["retry-after"]))
    status, headers, _ = login(port, USER, PASSWORD)
    assert status == 200, "the right password works once the wait is over"
    assert request(port, "GET", "/config", headers={"Cookie": cookie_of(headers)})[0] == 200
    assert login(port, USER, "wrong")[0] == 400  # a success clears the record: free tries again


# ------------------------------------------------------------------------------------ in-process server
@pytest.fixture(scope="module")
def served(tmp_path_factory, demo):
    """app.main(..., block=False) with a login: the running Blocks, its port, a logged-in cookie and the
    files the probes aim at."""
    import app

    base = tmp_path_factory.mktemp("served")
    out = base / "runs"
    samples = out / "lora" / "version_0" / "samples" / "step-1"
    samples.mkdir(parents=True)
    (samples / "0.png").write_bytes(b"\x89PNG\r\n\x1a\nreal sample")
    (base / "outside").mkdir()
    (base / "outside" / "secret.txt").write_text(MARK)
    (samples / "link.png").symlink_to(base / "outside" / "secret.txt")
    (out / "lora" / "version_0" / "escape").symlink_to(base / "outside")
    saved_env = {k: os.environ.get(k) for k in ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE")}
    port = free_port()
    blocks = app.main(["--port", str(port), "--output-dir", str(out), "--auth", f"{USER}:{PASSWORD}"], block=False)
    try:
        status, headers, _ = login(port, USER, PASSWORD)
        assert status == 200
        yield {"blocks": blocks, "port": port, "cookie": cookie_of(headers), "out": out, "base": base,
               "sample": samples / "0.png", "demo_image": next((demo / "images").rglob("*.png"))}
    finally:
        blocks.close()
        for k, v in saved_env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


# Routes that answer without a login by design; none carries user data (checked below).
PUBLIC = {"/", "/login", "/login/", "/logout", "/favicon.ico", "/theme.css", "/robots.txt", "/manifest.json",
          "/pwa_icon", "/pwa_icon/{size}", "/svelte/{path:path}", "/static/{path:path}", "/assets/{path:path}",
          "/gradio_api/user", "/gradio_api/user/", "/gradio_api/token", "/gradio_api/token/", "/gradio_api/app_id",
          "/gradio_api/app_id/", "/gradio_api/runs", "/gradio_api/runs/", "/gradio_api/heartbeat/{session_hash}",
          "/gradio_api/startup-events", "/gradio_api/theme.css"}
REFUSED = {401, 403, 404, 405, 422}


def test_every_route_without_the_login_is_refused_or_public_and_empty(served):
    port, routes = served["port"], app_routes(served["blocks"])
    assert len(routes) > 40 and any("file=" in p for p, _ in routes)
    for path, methods in routes:
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        for method in (m for m in methods if m != "HEAD"):
            status, _, body = request(port, method, concrete, b"" if method == "POST" else None)
            if path in PUBLIC:
                assert str(served["out"]).encode() not in body and b"Start training" not in body, path
            else:
                assert status in REFUSED, f"{method} {path} answered {status} without a login"


def traversal_probes(served) -> dict[str, str]:
    """name -> a path aimed outside the output folder, in every spelling."""
    out, base, demo_image = served["out"], served["base"], served["demo_image"]
    secret = base / "outside" / "secret.txt"
    rel = os.path.relpath(secret, out)
    return {
        "etc-passwd": "/etc/passwd", "absolute-outside": str(secret), "repo-file": str(ROOT / "app.py"),
        "repo-relative": "app.py", "demo-asset": str(demo_image), "dotdot": f"{out}/{rel}",
        "dotdot-deep": f"{out}/lora/version_0/../../{rel}", "relative-up": "../../../../../../etc/passwd",
        "encoded": quote(f"{out}/{rel}", safe=""), "encoded-dots": f"{out}/" + rel.replace("..", "%2e%2e"),
        "encoded-slash": f"{out}/" + rel.replace("/", "%2f"), "double-encoded": f"{out}/" + rel.replace("..", "%252e%252e"),
        "symlink-file": str(out / "lora" / "version_0" / "samples" / "step-1" / "link.png"),
        "symlink-dir": str(out / "lora" / "version_0" / "escape" / "secret.txt"),
        "backslash": f"{out}\\..\\..\\outside\\secret.txt", "nul": f"{out}/x%00/../../outside/secret.txt",
        "ssrf": "http://169.254.169.254/latest/meta-data/",
    }


def file_routes(blocks) -> list[str]:
    """Every GET route that takes a path (a `{...:path}` parameter or `file=`), from the running app."""
    return sorted({p for p, m in app_routes(blocks) if "GET" in m and (":path}" in p or "file=" in p)})


def test_files_outside_the_output_folder_are_never_served_by_any_route(served):
    port, cookie = served["port"], {"Cookie": served["cookie"]}
    routes = file_routes(served["blocks"])
    assert {"/gradio_api/file={path_or_url:path}", "/gradio_api/file/{path:path}", "/static/{path:path}",
            "/assets/{path:path}"} <= set(routes)
    leaks = []
    for route in routes:
        prefix = re.sub(r"\{[^}]+:path\}$", "", route)
        for name, probe in traversal_probes(served).items():
            status, _, body = request(port, "GET", prefix + (probe if probe.startswith("/") else probe), headers=cookie)
            # refused: any 4xx (Gradio's proxy route answers a NUL byte with a 500, which serves nothing either)
            if status < 400 or MARK.encode() in body or b"root:" in body or b"def check_exposure" in body:
                leaks.append(f"{route} {name}: {status} {body[:60]!r}")
    assert not leaks, "\n".join(leaks)
    status, headers, body = request(port, "GET", f"/gradio_api/file={served['sample']}", headers=cookie)
    assert status == 200 and body == served["sample"].read_bytes() and headers["content-type"] == "image/png"


def test_an_uploaded_page_is_served_as_a_download_never_as_a_page(served):
    port, cookie = served["port"], served["cookie"]
    html = b"<script>alert(1)</script>"
    upload = (b"--B\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.html\"\r\n"
              b"Content-Type: text/html\r\n\r\n" + html + b"\r\n--B--\r\n")
    status, _, body = request(port, "POST", "/gradio_api/upload", upload,
                              {"Content-Type": "multipart/form-data; boundary=B", "Cookie": cookie})
    assert status == 200
    stored = json.loads(body)[0]
    assert not Path(stored).resolve().is_relative_to(served["out"].resolve()), "uploads live outside the output folder"
    status, headers, _ = request(port, "GET", f"/gradio_api/file={stored}", headers={"Cookie": cookie})
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    assert headers["content-disposition"].startswith("attachment")


def test_a_foreign_host_name_is_refused(served):
    """A site whose name resolves to 127.0.0.1 (DNS rebinding) must not reach a loopback GUI."""
    port = served["port"]
    assert request(port, "GET", "/", headers={"Host": "evil.example"})[0] == 421
    assert request(port, "GET", "/", headers={"Host": f"evil.example:{port}"})[0] == 421
    assert request(port, "GET", "/", headers={"Host": f"localhost:{port}"})[0] == 200
    assert request(port, "GET", "/", headers={"Host": f"127.0.0.1:{port}"})[0] == 200


# ------------------------------------------------------------------------------------ names and paths
TRAVERSALS = ["../evil", "../../etc/passwd", "/etc/passwd", "..", ".", ".hidden", "a/b", "a\\b", "..\\x", "x/../../y",
              "%2e%2e%2fx", "nul", "CON", "x\x00y", "~/x", " ../x", "..json", "../x.json"]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    from gui.ui import build_ui

    out = tmp_path_factory.mktemp("ui") / "runs"
    os.environ["LATHE_PRESETS_DIR"] = str(out.parent / "presets")
    try:
        _, page = build_ui(out)
        yield page
    finally:
        os.environ.pop("LATHE_PRESETS_DIR", None)


def tree(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("*")} if folder.exists() else set()


def test_preset_names_cannot_leave_the_preset_folder(ui):
    from backend.config import ConfigError, TrainingConfig
    from backend.presets import delete_preset, load_preset, sanitize_preset_name, save_preset

    panel, p, root = ui.tabs["presets"], ui.tabs["presets"].p, ui.output_dir.parent
    decoy = root / "evil.json"
    decoy.write_text('{"schema_version": 1}')
    before = tree(root)
    for name in TRAVERSALS:
        with pytest.raises(ConfigError):
            sanitize_preset_name(name)
        for call in (lambda n: save_preset(TrainingConfig(), n, user_dir=ui.presets_dir),
                     lambda n: load_preset(n, ui.presets_dir), lambda n: delete_preset(n, ui.presets_dir)):
            with pytest.raises(ConfigError):
                call(name)
        for handler, data in ((panel.on_save, {p["name"]: name, p["overwrite"]: True}), (panel.on_load, {p["choice"]: name}),
                              (panel.on_delete, {p["choice"]: name})):
            out = handler(data)
            assert str(out[p["status"]]).startswith("✖"), (name, out[p["status"]])
    assert tree(root) == before and decoy.exists(), "a traversal name wrote or deleted a file"


def test_run_names_with_traversal_are_refused(ui):
    from gui.form import FormError, form_to_config

    # (".hidden", "nul", "CON" and "..json" are plain names in one folder; they are not traversals)
    for name in [*(n for n in TRAVERSALS if re.search(r"[/\\\x00~%]|^\.{1,2}$|^\s", n)), "a" * 81, ""]:
        with pytest.raises(FormError) as e:
            form_to_config({"run_name": name})
        assert any("Run name" in str(err) or "run_name" in str(err) for err in e.value.errors), name


def test_handlers_act_only_on_folders_inside_the_output_folder(ui, tmp_path):
    """A checkpoint path posted by a client (dropdown values are client data) outside the output
    folder is never verified, resumed, deleted or followed."""
    ck = tmp_path / "elsewhere" / "lora" / "version_0" / "checkpoints" / "epoch-000001"
    ck.mkdir(parents=True)
    (ck / "manifest.json").write_text('{"files": {}}')
    tab, c = ui.tabs["checkpoints"], ui.tabs["checkpoints"].c
    sneaky = [str(ck), f"{ui.output_dir}/../../{ck.relative_to(tmp_path.parent)}"]
    (ui.output_dir / "link").parent.mkdir(parents=True, exist_ok=True)
    (ui.output_dir / "link").symlink_to(tmp_path / "elsewhere")
    sneaky.append(str(ui.output_dir / "link" / "lora" / "version_0" / "checkpoints" / "epoch-000001"))
    for path in sneaky:
        data = {c["choice"]: path, c["version"]: str(ck.parent.parent), c["source"]: "checkpoint"}
        assert "Choose a checkpoint first" in tab.on_delete(data)[c["result"]]
        assert "Choose a checkpoint first" in tab.on_verify(data)[c["result"]]
        assert tab.on_resume(data)[c["result"]].startswith("✖")
        assert tab.on_plan(data)[c["resume"]]["interactive"] is False
        assert ck.is_dir()
    run = ui.tabs["run"]
    assert run.on_choice({run.c["choice"]: str(ck.parent.parent)})[run.c["follow"]]["version"] is None


# ------------------------------------------------------------------------------------ no shell
def shell_calls(path: Path) -> list[str]:
    """subprocess.*(..., shell=<anything but False>), os.system, os.popen, os.exec*/spawn* with a shell."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        shell = [k for k in node.keywords if k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)]
        if shell or name in ("os.system", "os.popen", "system", "popen", "commands.getoutput", "pty.spawn") \
                or re.fullmatch(r"(os\.)?(spawnl?p?e?|execl?p?e?)", name) and any("sh" in ast.unparse(a) for a in node.args[:2]):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:100]}")
    return found


def test_no_subprocess_ever_runs_through_a_shell():
    files = [ROOT / "app.py", *(ROOT / "backend").rglob("*.py"), *(ROOT / "gui").rglob("*.py")]
    assert len(files) > 30
    found = [hit for f in files for hit in shell_calls(f)]
    assert found == [], "\n".join(found)
    assert shell_calls_probe(), "the scan must see a shell call when there is one"


def shell_calls_probe() -> bool:
    import tempfile

    with tempfile.TemporaryDirectory(dir=ROOT) as d:
        probe = Path(d) / "probe.py"
        probe.write_text("import os, subprocess\nsubprocess.run('ls', shell=True)\nos.system('ls')\nos.popen('ls')\n")
        return len(shell_calls(probe)) == 3


# ------------------------------------------------------------------------------------ secrets
SECRETS = {"hf": "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz12", "wandb": "0123456789abcdef" * 2 + "01234567",
           "openai": "sk-" + "Zy9" * 10, "gh": "ghp_" + "Q" * 30, "password": "hunter2-very-secret"}


def kohya_with_secrets(path: Path) -> Path:
    data = {"LoRA_type": "Standard", "network_dim": 4, "network_alpha": 4, "optimizer": "AdamW", "learning_rate": 0.001,
            "epoch": 1, "train_batch_size": 4, "save_model_as": "safetensors",
            "huggingface_token": SECRETS["hf"], "wandb_api_key": SECRETS["wandb"], "api_key": SECRETS["openai"],
            "log_tracker_config": f"https://user:{SECRETS['password']}@tracker.example/x", "github_token": SECRETS["gh"],
            "huggingface_repo_id": "me/lora", "log_with": "wandb"}
    path.write_text(json.dumps(data))
    return path


@pytest.mark.train
def test_secrets_never_land_in_a_preset_or_a_real_runs_files(ui, demo, tmp_path, monkeypatch):
    """A kohya_ss config carrying tokens, imported and started through the GUI's handlers, with tokens in
    the environment too: the saved preset and every file of the run (config.json, hparams.yaml,
    command.txt, events.jsonl, train.log, status.json, checkpoint manifests) carry none of them."""
    monkeypatch.setenv("HF_TOKEN", SECRETS["hf"])
    monkeypatch.setenv("WANDB_API_KEY", SECRETS["wandb"])
    monkeypatch.setenv("OPENAI_API_KEY", SECRETS["openai"])
    panel, p, form = ui.tabs["presets"], ui.tabs["presets"].p, ui.form
    values, _ = ui.first_form()
    data = {form.components[k]: v for k, v in values.items()}
    out = panel.on_kohya({**data, p["kohya"]: str(kohya_with_secrets(tmp_path / "kohya.json"))})
    assert not str(out[p["status"]]).startswith("✖"), out[p["status"]]
    data.update({comp: value for comp, value in out.items() if comp in form.inputs})
    # the demo's data, schedule and saving settings back (kohya's defaults would train at 512 px), fast settings on top
    data.update({form.components[k]: v for k, v in values.items() if k.startswith(("dataset.", "training.", "saving."))})
    for key, value in {"model.pretrained_model": str(demo / "model"), "dataset.train_data_dir": str(demo / "images"),
                       "training.max_train_epochs": "", "training.max_train_steps": 2, "sampling.prompts": "",
                       "saving.save_every_n_epochs": "", "saving.save_last_n_epochs": "", "saving.save_every_n_steps": 1,
                       "run_name": "secrets",
                       "launch.device": "cpu"}.items():
        data[form.components[key]] = value
    saved = panel.on_save({**data, p["name"]: "shared", p["overwrite"]: True})
    assert str(saved[p["status"]]).startswith("✔"), saved[p["status"]]
    run = ui.tabs["run"]
    started = run.on_start(data)
    version = started[run.c["follow"]]["version"]
    assert version, started.get(run.c["message"])
    from backend import runs

    wait_until(lambda: runs.reconcile(version).get("state") in runs.FINAL_STATES, 240, 0.5, "the run to end")
    assert runs.read_status(version)["state"] == "finished", runs.log_tail(version)
    files = [ui.presets_dir / "shared.json", *(f for f in Path(version).rglob("*") if f.is_file() and f.suffix != ".safetensors"
                                               and f.stat().st_size < 5_000_000)]
    names = {f.name for f in files}
    assert {"config.json", "hparams.yaml", "command.txt", "events.jsonl", "train.log", "shared.json"} <= names
    leaks = [f"{f}: {what}" for f in files for what, secret in SECRETS.items() if secret.encode() in f.read_bytes()]
    assert leaks == []


@pytest.mark.browser
def test_the_login_page_works_in_a_browser(served):
    """The login page (its API description emptied) still logs a person in."""
    from playwright.sync_api import sync_playwright

    from tests.gui_helpers import BROWSER_ARGS, chromium_or_skip

    chromium = chromium_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
        page = browser.new_context().new_page()
        page.set_default_timeout(30_000)
        page.goto(f"http://127.0.0.1:{served['port']}/")
        page.get_by_label("username").fill(USER)
        page.get_by_label("password").fill(PASSWORD)
        page.get_by_role("button", name="Login").click()
        page.locator("#f-run_name input").wait_for()
        browser.close()
