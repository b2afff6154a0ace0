"""Boot files a node was refused (sans-IO: plain values, `now` passed in).

Shared by the boot services (http, tftp). When a known node's request for a boot file
(loader, kernel, initramfs, rootfs, image, ignition) ends in a 403/404 or a TFTP error,
the operator gets one WARNING line and the node a `boot-error` event. Firmware retries
(a PXE ROM resends its request, iPXE loops, a node reboots into the same failure every
minute), so a node and path says so once per WINDOW: the repeats are counted, and the
next line says how many there were, as a rate-limited syslog does.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

from appliance.events import boot_error_detail
from appliance.logs import escape
from appliance.ratelog import RateGate
from services.bootstage import boot_file

__all__ = ["CAUSES", "BootErrors", "Report", "boot_file", "tftp_cause"]

WINDOW = 60.0  # s: one line and one event per node, path and cause in this time
KEEP = 4096  # node+path keys remembered (the oldest go first): memory stays bounded
# Lines and events per node in a window, whatever the paths: a spoofed TFTP request
# "from" a node's address, a new name each time, must not flood the log or the store.
NODE_BURST = 8
MAX_PATH = 200  # characters of the client's path kept in a detail (a TFTP name may be 4 KiB)

# cause -> (label for the metric, words for the operator)
CAUSES = {
    "missing": "missing",
    "unreadable": "unreadable by the appliance's user",
    "not_owner": "not the owner (this file belongs to other nodes)",
    "bootstrap_retired": "bootstrap retired (bootstrap is complete: its ignition is gone)",
    "refused": "refused",
}


def tftp_cause(code: int, message: str) -> str:
    """The cause of a TFTP refusal (services.tftp.files.Refused)."""
    if code == 1:
        return "missing"
    if message == "permission denied":
        return "unreadable"
    return "refused"


@dataclass(frozen=True)
class Report:
    """What to say about one refusal: the event detail and the log line."""

    detail: str
    line: str


class BootErrors:
    """Counts every refusal (by cause) and decides which get a line and an event."""

    def __init__(self, window: float = WINDOW, keep: int = KEEP, burst: int = NODE_BURST) -> None:
        self.window = window
        self.keep = keep
        self.burst = burst
        self._bursts = RateGate(window, burst, keep)  # reports per node in a window
        self.counts: Counter[str] = Counter()  # cause -> refusals, every one
        self.suppressed = 0  # repeats not logged
        self._last: OrderedDict[tuple[str, str, str], tuple[float, int]] = OrderedDict()

    def refused(
        self,
        node: str,
        address: str,
        what: str,
        path: str,
        cause: str,
        via: str,
        now: float,
        reason: str = "",
    ) -> Report | None:
        """Count a refusal; a Report when it is the first of its node, path and cause in
        the window. `reason`: the folder a missing file was looked for in, or a
        refusal's own words."""
        self.counts[cause] += 1
        # The path is the client's: it goes to terminals (`appliance nodes`) and the
        # store, so no control characters (as in the log) and a bounded length.
        path = escape(path)
        path = path if len(path) <= MAX_PATH else path[: MAX_PATH - 1] + "…"
        key = (node, path, cause)
        seen = self._last.get(key)
        if seen is not None and now - seen[0] < self.window:
            self._last[key] = (seen[0], seen[1] + 1)
            self.suppressed += 1
            return None
        if not self._bursts.admit(node, now).write:
            self.suppressed += 1  # this node said enough for now: counted only
            return None
        repeats = seen[1] if seen is not None else 0
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        while len(self._last) > self.keep:
            self._last.popitem(last=False)
        words = CAUSES.get(cause, cause)
        if reason and cause == "refused":
            words = f"refused: {escape(reason)}"
        elif reason and cause == "missing":
            words = f"missing in {reason}"
        detail = boot_error_detail(what, path, words, via)
        line = f"boot error: {node} ({address}) {detail}"
        if repeats:
            line += f"; refused {repeats} more times since the last line"
        return Report(detail, line)

    def status(self) -> dict[str, int]:
        return dict(self.counts)
