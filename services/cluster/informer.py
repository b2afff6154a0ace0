"""List, then watch from the list's resourceVersion; list again when the watch says 410.

The caller gets the whole set at every (re)list (`on_list`, which replaces what it
knew, so objects deleted while no watch ran disappear) and each change after it
(`on_event`). A watch that the server ends normally is resumed from the last
resourceVersion seen (BOOKMARK events move it too), so nothing is missed between
watches. Connection trouble (Unreachable) goes to the caller, who backs off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from services.cluster.kube import Gone, Kube, KubeError, Resource

MAX_EXPIRED = 3  # 410s in a row (each after a fresh list) before giving up to a back-off
QUICK = 1.0  # seconds: a watch that ends empty sooner than this is waited for

OnList = Callable[[list[dict[str, Any]]], None]
OnEvent = Callable[[str, dict[str, Any]], None]


def resource_version(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


class Informer:
    def __init__(
        self,
        kube: Kube,
        res: Resource,
        on_list: OnList,
        on_event: OnEvent,
        *,
        namespace: str | None = None,
        field_selector: str | None = None,
        watch_timeout: float = 300.0,
    ) -> None:
        self.kube = kube
        self.res = res
        self.on_list = on_list
        self.on_event = on_event
        self.namespace = namespace
        self.field_selector = field_selector
        self.watch_timeout = watch_timeout
        self.lists = 0  # how many times the whole set was listed
        self.gone = 0  # 410s that forced a relist
        self.events = 0

    async def run(self) -> None:
        version = ""
        expired = 0  # 410s in a row with no event in between
        loop = asyncio.get_running_loop()
        while True:
            if not version:
                listing = await self.kube.list(self.res, self.namespace, self.field_selector)
                items = [i for i in listing.get("items") or [] if isinstance(i, dict)]
                version = resource_version(listing)
                self.lists += 1
                self.on_list(items)
                if not version:  # nothing to watch from: the caller backs off and retries
                    raise KubeError(200, "BadResponse", f"{self.res.plural} list has no version")
            began, seen = loop.time(), self.events
            try:
                async for kind, obj in self.kube.watch(
                    self.res, version, self.namespace, self.field_selector, self.watch_timeout
                ):
                    version = resource_version(obj) or version
                    if kind == "BOOKMARK":
                        continue
                    self.events += 1
                    expired = 0
                    self.on_event(kind, obj)
            except Gone:
                self.gone += 1
                version = ""  # compacted past us: the events in between are lost, relist
                expired += 1
                if expired > MAX_EXPIRED:  # even fresh versions expire: let the caller back off
                    raise
                continue
            if self.events == seen and loop.time() - began < QUICK:
                # The server ended an empty watch at once: do not spin on it.
                await asyncio.sleep(QUICK)
