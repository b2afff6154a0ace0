"""The layers hold at import time: a pure core pulls in no event loop, no aiohttp, no
sqlite3 and no other service (import-linter checks the import graph in CI; this checks
what really lands in sys.modules, which also catches a third-party package that imports
asyncio behind our back).

Each module is imported in a fresh interpreter: this process has long since imported
everything.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest

SERVICES = ("dhcp", "dns", "tftp", "http", "proxy", "cluster")

ROOT = Path(__file__).resolve().parents[2]


def _contract(contract_id: str) -> dict[str, Any]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    found: list[dict[str, Any]] = [c for c in config["contracts"] if c["id"] == contract_id]
    assert len(found) == 1, f"no import-linter contract {contract_id!r} in pyproject.toml"
    return found[0]


# Sans-IO cores (plain code over bytes and values, `now` an argument): the list that
# import-linter's contract checks, so a core added there is checked here too.
CORES: tuple[str, ...] = tuple(_contract("pure-cores")["source_modules"])

# Top-level packages no core may load, directly or through a dependency. The asyncio
# package itself is on the list: no dependency of a core (pydantic, dnslib,
# cryptography, yaml) imports it today, so any asyncio at all is a regression.
FORBIDDEN_TOPS = {
    "asyncio",
    "uvloop",
    "aiohttp",
    "sqlite3",
    "_sqlite3",
    "kubernetes_asyncio",
    "appliance.service",
    "appliance.store",
    "appliance.storequeue",
    "appliance.supervisor",
    "appliance.registry",
}

_PROBE = """
import importlib, json, sys
before = set(sys.modules)
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(set(sys.modules) - before)))
"""


@cache
def loaded_by(module: str) -> frozenset[str]:
    """The modules `import <module>` adds to a fresh interpreter's sys.modules."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, module],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    return frozenset(json.loads(out.stdout))


def _forbidden(loaded: frozenset[str]) -> list[str]:
    return sorted(
        m for m in loaded if any(m == top or m.startswith(top + ".") for top in FORBIDDEN_TOPS)
    )


def _own_service(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) > 1 and parts[0] == "services" and parts[1] in SERVICES:
        return parts[1]
    return None  # the framework, or a module every service shares (services.bootfiles)


@pytest.mark.parametrize("core", CORES)
def test_core_imports_no_event_loop_aiohttp_sqlite_or_shell(core: str) -> None:
    assert _forbidden(loaded_by(core)) == []


@pytest.mark.parametrize("core", CORES)
def test_core_imports_no_other_service(core: str) -> None:
    own = _own_service(core)
    others = sorted(m for m in loaded_by(core) if _own_service(m) not in (None, own))
    assert others == []


@pytest.mark.parametrize("service", SERVICES)
def test_service_package_import_is_only_its_docstring(service: str) -> None:
    """The composition root is appliance.registry: `import services.<x>` runs nothing."""
    assert loaded_by(f"services.{service}") == {"services", f"services.{service}"}


def test_daemon_does_not_import_the_cli_client() -> None:
    loaded = loaded_by("appliance.supervisor")
    assert "appliance.client" not in loaded
    assert "appliance.cli" not in loaded


def test_addresses_need_no_pydantic() -> None:
    assert not any(
        m == "pydantic" or m.startswith("pydantic.") for m in loaded_by("appliance.addr")
    )


def test_core_list_names_real_modules() -> None:
    """A core renamed or split must not silently drop out of both checks."""
    assert len(CORES) >= 20
    for core in CORES:
        assert (ROOT / (core.replace(".", "/") + ".py")).is_file(), core


def test_registry_lists_every_service_in_start_order() -> None:
    from appliance import registry

    names = [spec.name for spec in registry.specs()]
    assert names == ["dns", "dhcp", "tftp", "http", "proxy", "cluster", "admin"]
