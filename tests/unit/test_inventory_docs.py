"""docs/inventory.md documents every key of the inventory model (contract and added)."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator

from pydantic import BaseModel

from appliance.inventory import Inventory
from tests.helpers import ROOT


def _models(annotation: object) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            yield from _models(arg)


def _keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        is_list = typing.get_origin(field.annotation) is list
        subs = list(_models(field.annotation))
        if not subs:
            yield path  # a leaf: documented by name
        for sub in subs:
            yield from _keys(sub, f"{path}[]." if is_list else f"{path}.")


def test_every_key_is_documented() -> None:
    doc = (ROOT / "docs" / "inventory.md").read_text()
    keys = list(_keys(Inventory))
    assert "nodes[].mac" in keys and "load_balancer.idle_timeout.api" in keys
    missing = [k for k in keys if f"`{k}`" not in doc]
    assert not missing, f"docs/inventory.md lacks {missing}"
