"""The Run tab's two live channels, apart from what they carry (no handlers here).

* `Streams`: which server-side stream is the current one of each browser session (a token per
  session), whether one runs it, and when it last looked; the watchdog asks `stalled`.
* `LIVE_JS`: the page's script that long-polls the progress bar's server function and redraws the
  bar at most every LIVE_GAP_S.
* `same_as_sent`: what a session's page already shows, so a part is sent only when it changed.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import gradio as gr

STALE_S = 5.0  # a stream that has not looked for this long has stopped


class Streams:
    """Which stream is the current one of each browser session, whether it runs, when it last looked."""

    def __init__(self) -> None:
        self._tokens = itertools.count(1)
        self._current: dict[str, list[Any]] = {}  # session -> [token, last beat, a stream runs it]
        self._lock = threading.Lock()

    def claim(self, session: str | None) -> int:
        """A new token for `session`: the stream holding the old one ends at its next look."""
        token = next(self._tokens)
        if session is not None:
            with self._lock:
                self._current[session] = [token, time.monotonic(), False]
        return token

    def enter(self, session: str, token: int) -> bool:
        """Whether a stream starting with `token` is to run: the token is current and no other stream
        runs it (a handler that attached nothing leaves the old token in the state)."""
        with self._lock:
            current = self._current.get(session)
            if current is None or current[0] != token or current[2]:
                return False
            current[1:] = [time.monotonic(), True]
            return True

    def beat(self, session: str, token: int) -> bool:
        """True (and noted) while `token` is the session's current stream."""
        with self._lock:
            current = self._current.get(session)
            if current is None or current[0] != token:
                return False
            current[1] = time.monotonic()
            return True

    def stalled(self, session: str | None) -> bool:
        """No stream of `session` has looked for STALE_S (or none was ever started)."""
        if session is None:
            return False
        with self._lock:
            current = self._current.get(session)
        return current is None or time.monotonic() - current[1] > STALE_S

    def forget(self, session: str | None) -> None:
        with self._lock:
            self._current.pop(session, None)

def session_of(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


LIVE_GAP_S = 0.2  # the page redraws the progress bar at most this often (each redraw costs the trainer CPU)
LIVE_JS = """
if (!element.__latheLive) {
  const GAP_MS = @GAP_MS@;
  element.__latheLive = true;
  const pause = (ms) => new Promise((done) => setTimeout(done, ms));
  (async () => {
    let key = "";
    while (element.isConnected) {
      const bar = element.querySelector(".lathe-progress");
      const version = bar ? bar.dataset.version || "" : "";
      if (!version || element.offsetParent === null) { await pause(500); continue; }  // no run, or tab hidden
      try {
        const got = await server.live_progress({version: version, key: key});
        if (!got) { await pause(1000); continue; }
        if (got.key !== key) { key = got.key; props.value = got.html; await pause(GAP_MS); }
      } catch (e) { await pause(2000); }
    }
  })();
}
""".replace("@GAP_MS@", str(int(LIVE_GAP_S * 1000)))


def same_as_sent(sent: dict[str, Any], component: Any, value: Any) -> bool:
    """Whether the page already shows `value` in `component` (text and updates are compared; a
    frame is always new). Notes `value` as sent otherwise: every redraw costs the browser."""
    if not isinstance(value, (str, dict)):
        return False
    key = str(getattr(component, "_id", id(component)))
    mark = hash(value if isinstance(value, str) else repr(sorted(value.items())))
    if sent.get(key) == mark:
        return True
    sent[key] = mark
    return False
