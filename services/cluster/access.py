"""What a request needs: the authorization attributes the API server checks (pure).

`request_attributes(method, path, query)` derives (verb, API group, resource,
subresource, namespace, name) as the API server's request-info resolver does, so a 403
is reported with the exact rule that would allow the request (and no guess from the
message text).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Rule = dict[str, list[str]]


def make_rule(
    group: str, resources: list[str], verbs: list[str], names: list[str] | None = None
) -> Rule:
    rule: Rule = {"apiGroups": [group], "resources": resources, "verbs": verbs}
    if names:
        rule["resourceNames"] = list(names)
    return rule


@dataclass(frozen=True, slots=True)
class Attributes:
    """What the API server authorizes for one request."""

    verb: str
    group: str
    resource: str
    subresource: str = ""
    namespace: str = ""
    name: str = ""

    @property
    def full_resource(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource

    def rule(self) -> Rule:
        """The narrowest rule that allows this request."""
        # CSR names are made up by each kubelet: a rule naming one helps no one.
        named = self.verb not in ("create", "deletecollection")
        named = named and self.resource != "certificatesigningrequests"
        names = [self.name] if self.name and named else []
        return make_rule(self.group, [self.full_resource], [self.verb], names)

    def describe(self) -> str:
        """`get etcds.operator.openshift.io "cluster" at the cluster scope`."""
        what = self.full_resource + (f".{self.group}" if self.group else "")
        name = f' "{self.name}"' if self.name else ""
        where = f'in the namespace "{self.namespace}"' if self.namespace else "at the cluster scope"
        return f"{self.verb} {what}{name} {where}"

    def rule_text(self) -> str:
        """The missing rule as one line, in the form of the rendered roles."""
        parts = [f"{key}: {json.dumps(value)}" for key, value in self.rule().items()]
        kind = f'Role in "{self.namespace}"' if self.namespace else "ClusterRole"
        return f"{kind} rule {{{', '.join(parts)}}}"

    def to_json(self) -> dict[str, Any]:
        return {
            "verb": self.verb,
            "apiGroup": self.group,
            "resource": self.full_resource,
            "namespace": self.namespace or None,
            "name": self.name or None,
            "rule": self.rule(),
        }


_NAMESPACE_SUBRESOURCES = ("status", "finalize")


def request_attributes(
    method: str, path: str, query: Mapping[str, str] | None = None
) -> Attributes | None:
    """The authorization attributes of a resource request (None: not a resource path)."""
    query = query or {}
    parts = [p for p in path.split("?")[0].split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    if not rest:
        return None
    namespace = ""
    # /namespaces/<ns>/<resource>/... is namespaced; /namespaces/<name>[/status] is the
    # Namespace object itself.
    if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in _NAMESPACE_SUBRESOURCES:
        namespace, rest = rest[1], rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    sub = rest[2] if len(rest) > 2 else ""
    method = method.upper()
    if method in ("GET", "HEAD"):
        if name:
            verb = "get"
        elif query.get("watch") in ("true", "1"):
            verb = "watch"
        else:
            verb = "list"
    else:
        verb = {
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if name else "deletecollection",
        }.get(method, method.lower())
    if not name and verb in ("list", "watch"):
        # The API server takes the name from fieldSelector metadata.name=<name> for
        # list and watch, so a rule with resourceNames can allow them.
        for term in (query.get("fieldSelector") or "").split(","):
            field, _, value = term.partition("=")
            if field.strip() == "metadata.name":
                name = value.lstrip("=").strip()
    return Attributes(verb, group, resource, sub, namespace, name)
