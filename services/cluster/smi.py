"""Parse what `nvidia-smi` printed in a validation pod (sans-IO).

The default table of nvidia-smi (driver 4xx to 5xx layouts): a header line with the
NVIDIA-SMI, driver and CUDA versions, then two lines per GPU, the first with index,
name, persistence mode and bus id, the second with memory use "x MiB / y MiB".
Failures (no driver, no devices) are recognised and raised with nvidia-smi's words.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

_HEADER = re.compile(
    r"NVIDIA-SMI\s+(?P<smi>[\w.\-]+)\s+Driver Version:\s*(?P<driver>[\w.\-]+)"
    r"(?:\s+CUDA Version:\s*(?P<cuda>[\w.\-]+|N/A))?"
)
_GPU = re.compile(
    r"^\|\s*(?P<index>\d+)\s+(?P<name>.+?)\s+(?:On|Off)\s*\|\s*"
    r"(?P<bus>[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f])\s"
)
_MEMORY = re.compile(r"(?P<used>\d+)\s*MiB\s*/\s*(?P<total>\d+)\s*MiB")
_FAILURES = (
    "NVIDIA-SMI has failed",
    "No devices were found",
    "Failed to initialize NVML",
    "command not found",
    "executable file not found",
)


class SmiError(ValueError):
    """The log is not a usable nvidia-smi table; the message says what it showed."""


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int
    name: str
    bus_id: str
    memory_mib: int | None


@dataclass(frozen=True, slots=True)
class SmiReport:
    smi_version: str
    driver: str
    cuda: str | None
    gpus: tuple[Gpu, ...]

    @property
    def count(self) -> int:
        return len(self.gpus)

    @property
    def models(self) -> dict[str, int]:
        return dict(Counter(g.name for g in self.gpus))

    def to_dict(self) -> dict[str, Any]:
        return {
            "smi_version": self.smi_version,
            "driver": self.driver,
            "cuda": self.cuda,
            "count": self.count,
            "models": self.models,
            "gpus": [
                {"index": g.index, "name": g.name, "bus_id": g.bus_id, "memory_mib": g.memory_mib}
                for g in self.gpus
            ],
        }


def parse_nvidia_smi(log: str) -> SmiReport:
    """The GPU model(s), count, driver and CUDA versions, or SmiError."""
    for failure in _FAILURES:
        for line in log.splitlines():
            if failure in line:
                raise SmiError(line.strip()[:300])
    header = _HEADER.search(log)
    if header is None:
        shown = log.strip().splitlines()[:1]
        raise SmiError(
            "no nvidia-smi header (NVIDIA-SMI ... Driver Version ...) in the log"
            + (f": starts with {shown[0][:120]!r}" if shown else ": the log is empty")
        )
    lines = log.splitlines()
    gpus: list[Gpu] = []
    for i, line in enumerate(lines):
        found = _GPU.match(line.strip())
        if found is None:
            continue
        memory = None
        if i + 1 < len(lines) and (mem := _MEMORY.search(lines[i + 1])):
            memory = int(mem["total"])
        gpus.append(Gpu(int(found["index"]), found["name"].strip(), found["bus"], memory))
    if not gpus:
        raise SmiError("nvidia-smi listed no GPU")
    cuda = header["cuda"]
    return SmiReport(
        smi_version=header["smi"],
        driver=header["driver"],
        cuda=None if cuda in (None, "N/A") else cuda,
        gpus=tuple(gpus),
    )
