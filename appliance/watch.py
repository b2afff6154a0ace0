"""`appliance watch`: node stages live, from the admin API's events stream.

On a terminal the screen is redrawn (the nodes table with progress bars and the
latest events) at every event and every second; otherwise each event is one line,
so the output can be piped or logged. Ctrl-C ends it cleanly (exit 0), as do
`--count` events or `--timeout` seconds. A stream that breaks (the daemon restarts
or the admin endpoint moves) is resumed from the last event id, a bounded number
of times.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from typing import Any, TextIO

from appliance import client
from appliance.client import ClientError
from appliance.terminal import (
    CLEAR,
    HIDE_CURSOR,
    SHOW_CURSOR,
    event_line,
    nodes_table,
    watch_screen,
)

RECENT = 8  # events under the table on a terminal
RECONNECTS = 10  # attempts in a row before giving up on a lost daemon
TTY_TICK = 1.0  # seconds between redraws on a terminal (keep-alive interval asked for)


class Watch:
    def __init__(
        self,
        target: client.Target,
        *,
        tty: bool,
        count: int | None = None,
        timeout: float | None = None,
        out: TextIO | None = None,
        domain: str = "",
    ) -> None:
        self.domain = domain  # the cluster the answering daemon serves
        self.target = target
        self.tty = tty
        self.count = count
        self.deadline = time.monotonic() + timeout if timeout else None
        self.out = out or sys.stdout
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.view: dict[str, Any] = {}
        self.seen = 0

    def run(self, *, once: bool = False) -> int:
        self.view = client.call(self.target, "GET", "/api/v1/nodes")
        if once:
            self._print("\n".join(nodes_table(self.view, self.view["time"])))
            return 0
        after = int(self.view["last_event_id"])
        try:
            if self.tty:
                self.out.write(HIDE_CURSOR)
                self._draw()
            else:
                self._print("\n".join(nodes_table(self.view, self.view["time"])))
            failures = 0
            while True:
                try:
                    for message in client.events(self.target, after=after, keepalive=self._tick()):
                        if self._expired():
                            return 0
                        if message is None:
                            if self.tty:
                                self._draw()
                            continue
                        failures = 0
                        after = self._event(message.data, message.id, after)
                        if self.count is not None and self.seen >= self.count:
                            return 0
                except ClientError as exc:
                    reason = str(exc)
                else:
                    reason = "the appliance closed the events stream"
                failures += 1
                if failures > RECONNECTS:
                    raise ClientError(f"{reason}; gave up after {RECONNECTS} attempts")
                if not self.tty:
                    print(f"appliance: {reason}; reconnecting", file=sys.stderr)
                time.sleep(self._pause(min(failures, 5)))
                if self._expired():
                    return 0
        except KeyboardInterrupt:
            return 0
        finally:
            if self.tty:
                self.out.write(SHOW_CURSOR + "\n")
                self.out.flush()

    def _event(self, data: str, id: str | None, after: int) -> int:
        try:
            ev = json.loads(data)
            new_after = int(id) if id is not None else int(ev["id"])
        except (ValueError, KeyError, TypeError):
            return after  # not an event this client understands: skip it
        self.seen += 1
        if self.tty:
            self.recent.appendleft(ev)
            self.view = client.call(self.target, "GET", "/api/v1/nodes")
            self._draw()
        else:
            self._print(event_line(ev))
        return new_after

    def _tick(self) -> float:
        # A terminal redraws every second; a pipe only needs to notice its deadline.
        return TTY_TICK if self.tty or self.deadline is not None else 15.0

    def _expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _pause(self, seconds: float) -> float:
        if self.deadline is None:
            return seconds
        return max(0.0, min(seconds, self.deadline - time.monotonic()))

    def _draw(self) -> None:
        now = time.time()
        title = f"appliance watch: {self.domain}"
        lines = watch_screen(self.view, list(self.recent), now, title=title)
        self.out.write(CLEAR + "\n".join(lines) + "\n")
        self.out.flush()

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)
