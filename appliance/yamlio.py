"""YAML reading that suits an inventory: no surprises from YAML 1.1.

PyYAML's SafeLoader reads an unquoted `52:54:00:00:00:01` as a base-60 integer
and silently keeps the last of two equal keys. Both turn typos into wrong
clusters, so this loader keeps colon-separated scalars as strings and refuses
duplicate keys with their line.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class YamlError(Exception):
    """A YAML document that cannot be read; the message names line and column."""


class _InventoryLoader(yaml.SafeLoader):
    pass


# Drop the sexagesimal (base 60) int and float forms: keep everything else SafeLoader knows.
_INT = re.compile(
    r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""",
    re.X,
)
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)

_InventoryLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_InventoryLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
_InventoryLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _construct_mapping(loader: _InventoryLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            mark = key_node.start_mark
            raise YamlError(
                f"line {mark.line + 1}, column {mark.column + 1}: key {key!r} appears twice "
                "in one mapping"
            )
        result[key] = loader.construct_object(value_node, deep=True)
    return result


_InventoryLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def load_yaml(text: str) -> Any:
    """Parse one YAML document; raise YamlError with line and column on bad syntax."""
    try:
        return yaml.load(text, Loader=_InventoryLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise YamlError(f"{where}YAML syntax error: {exc.problem or exc.context}") from None
    except yaml.reader.ReaderError as exc:  # a control character (NUL, ESC...) in the text
        line = text[: exc.position].count("\n") + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise YamlError(f"line {line}: character 0x{char:02x} is not allowed in YAML") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise YamlError(f"YAML syntax error: {first}") from None
