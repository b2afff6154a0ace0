"""One rate-limited logger for every service.

Clients decide how often something goes wrong (a PXE ROM resends, a scanner sends junk, a
spoofed address repeats), so a line per event would let them flood the journal. Each kind
of line (a key: "malformed", ("client_limit", peer), ...) gets at most `burst` lines per
`every` seconds; the events in between are counted, and the next line that is let through
says how many were held back, as a rate-limited syslog does. The decision (`RateGate`) is
plain code with `now` passed in; `RateLimitedLog` puts it in front of a logging.Logger.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

__all__ = ["RateGate", "RateLimitedLog", "Verdict"]

KEEP = 1024  # keys remembered (the least recently seen go first): memory stays bounded


@dataclass(frozen=True)
class Verdict:
    """Whether to write this event's line, and how many events of its key were held back
    since the last line of that key."""

    write: bool
    held: int = 0


_QUIET = Verdict(False)


class RateGate:
    """At most `burst` events per key in a window of `every` seconds are let through."""

    def __init__(self, every: float, burst: int = 1, keep: int = KEEP) -> None:
        if every < 0 or burst < 1 or keep < 1:
            raise ValueError("every >= 0, burst >= 1 and keep >= 1")
        self.every = every
        self.burst = burst
        self.keep = keep
        # key -> [window start, lines written in it, events held back since the last line]
        self._keys: OrderedDict[Hashable, list[float]] = OrderedDict()
        self.held = 0  # events held back, every key, ever

    def admit(self, key: Hashable, now: float) -> Verdict:
        state = self._keys.get(key)
        if state is None:
            self._keys[key] = [now, 1, 0]
            if len(self._keys) > self.keep:
                self._keys.popitem(last=False)
            return Verdict(True)
        self._keys.move_to_end(key)
        start, written, held = state
        if not 0 <= now - start < self.every:  # the window is over (or the clock stepped back)
            state[0], state[1], state[2] = now, 1, 0
            return Verdict(True, int(held))
        if written < self.burst:
            state[1], state[2] = written + 1, 0
            return Verdict(True, int(held))
        state[2] = held + 1
        self.held += 1
        return _QUIET

    def pending(self) -> int:
        """Events held back and not yet told in a line."""
        return int(sum(state[2] for state in self._keys.values()))


class RateLimitedLog:
    """A Logger's methods with a RateGate in front: `key` names the kind of line."""

    def __init__(
        self,
        logger: logging.Logger,
        every: float = 60.0,
        burst: int = 1,
        keep: int = KEEP,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.gate = RateGate(every, burst, keep)
        self.clock = clock

    def log(
        self,
        level: int,
        key: Hashable,
        msg: str,
        *args: object,
        extra: Mapping[str, object] | None = None,
        exc_info: bool | BaseException = False,
    ) -> bool:
        """Write the line unless its key said enough lately; True when it was written."""
        if not self.logger.isEnabledFor(level):
            return False
        verdict = self.gate.admit(key, self.clock())
        if not verdict.write:
            return False
        if verdict.held:
            msg += " (%d more like this in the last %g s were not logged)"
            args = (*args, verdict.held, self.gate.every)
        self.logger.log(level, msg, *args, extra=extra, exc_info=exc_info)
        return True

    def warning(
        self, key: Hashable, msg: str, *args: object, extra: Mapping[str, object] | None = None
    ) -> bool:
        return self.log(logging.WARNING, key, msg, *args, extra=extra)

    def info(
        self, key: Hashable, msg: str, *args: object, extra: Mapping[str, object] | None = None
    ) -> bool:
        return self.log(logging.INFO, key, msg, *args, extra=extra)

    def error(
        self, key: Hashable, msg: str, *args: object, extra: Mapping[str, object] | None = None
    ) -> bool:
        return self.log(logging.ERROR, key, msg, *args, extra=extra)

    def exception(
        self, key: Hashable, msg: str, *args: object, extra: Mapping[str, object] | None = None
    ) -> bool:
        """error() with the exception being handled (its traceback), as Logger.exception."""
        return self.log(logging.ERROR, key, msg, *args, extra=extra, exc_info=True)
