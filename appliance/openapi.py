"""The admin endpoint's OpenAPI 3 document, served at /api/v1/openapi.json.

Written as data next to the handlers it describes (appliance/admin.py); tests check
that every route of the server is here and every path here is a route, and run
property tests (schemathesis) against it. Schemas list what clients may rely on;
objects stay open (more fields may appear) so a newer daemon does not break them.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from appliance import __version__
from appliance.events import STAGES, STATES

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None) -> Schema:
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **(optional or {})},
    }


def _nullable(schema: Schema) -> Schema:
    return {**schema, "nullable": True}


STR: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
NUM: Schema = {"type": "number"}
BOOL: Schema = {"type": "boolean"}
TIME: Schema = {"type": "number", "description": "seconds since the Unix epoch"}
ANY_OBJ: Schema = {"type": "object", "additionalProperties": True}
STAGE: Schema = {"type": "string", "enum": list(STAGES)}
# An event's stage: a progress stage, or a state such as boot-error (not progress).
EVENT_STAGE: Schema = {"type": "string", "enum": [*STAGES, *STATES]}
EVENT_ID: Schema = {"type": "integer", "minimum": 0, "maximum": 10**18 - 1}
# One message of the events stream (fields as the SSE format has them; data is JSON).
SSE_EVENT: Schema = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["stage"]},
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "data": {"type": "string", "description": "an Event as JSON"},
    },
}

SCHEMAS: dict[str, Schema] = {
    "Error": _obj({"error": STR}),
    "StageTime": _obj({"first": TIME, "last": TIME, "detail": STR}),
    "TimelineEntry": _obj(
        {
            "stage": STAGE,
            "state": {
                "type": "string",
                "enum": ["done", "skipped", "next", "pending", "previous", "error"],
                "description": "error: the node's latest request for this stage's file "
                "was refused (see the node's boot_error)",
            },
            "first": _nullable(TIME),
            "last": _nullable(TIME),
            "detail": STR,
        },
        {"error": STR, "error_time": TIME},
    ),
    "BootError": _obj(
        {
            "stage": STAGE,
            "detail": {
                **STR,
                "description": "what was refused, the path, the cause and how: "
                "`kernel /images/k: missing in /srv/images (http 404)`",
            },
            "last": {**TIME, "description": "when it was refused (the latest time)"},
        }
    ),
    "Node": _obj(
        {
            "name": STR,
            "fqdn": STR,
            "role": {"type": "string", "enum": ["bootstrap", "master", "worker"]},
            "mac": STR,
            "ip": STR,
            "gpu": BOOL,
            "stages": {"type": "object", "additionalProperties": _ref("StageTime")},
            "timeline": {"type": "array", "items": _ref("TimelineEntry")},
            "current": _nullable(STAGE),
            "waiting_for": _nullable(STAGE),
            "since": _nullable(TIME),
            "waiting_seconds": _nullable(NUM),
            "progress": {"type": "number", "minimum": 0, "maximum": 1},
            "complete": BOOL,
            "next_boot": {"type": "string", "enum": ["install", "local"]},
            "installed_at": _nullable(TIME),
            "reinstall_requested": _nullable(TIME),
            "boot_error": {
                "allOf": [_ref("BootError")],  # a $ref takes no siblings in OpenAPI 3.0
                "nullable": True,
                "description": "the node was refused a boot file (403/404, a TFTP error) "
                "and has not got past that stage since",
            },
        }
    ),
    "Event": _obj(
        {
            "id": INT,
            "node": STR,
            "stage": EVENT_STAGE,
            "detail": STR,
            "time": TIME,
            "source": STR,
            "ok": {
                "type": "boolean",
                "description": "false: an attempt that was refused (e.g. a CSR left pending); "
                "the node has not reached the stage",
            },
        }
    ),
    "NodeList": _obj(
        {
            "time": TIME,
            "last_event_id": {
                "type": "integer",
                "description": "resume the events stream after this id to miss nothing",
            },
            "stages": {"type": "array", "items": STAGE},
            "nodes": {"type": "array", "items": _ref("Node")},
        }
    ),
    "NodeDetail": {
        "allOf": [
            _ref("Node"),
            _obj({"events": {"type": "array", "items": _ref("Event")}}),
        ]
    },
    "Status": _obj(
        {
            "time": TIME,
            "version": STR,
            "uptime": NUM,
            "cluster": _nullable(STR),
            "nodes": INT,
            "services": {
                "type": "object",
                "additionalProperties": _obj(
                    {
                        "state": {"type": "string", "enum": ["running", "off", "standby"]},
                        "listen": {"type": "array", "items": STR},
                    }
                ),
            },
            "reloads": ANY_OBJ,
            "events": ANY_OBJ,
            "store": ANY_OBJ,  # the state store's write queue: queued, busy, retries, lost
            "plan": _obj(
                {
                    "domain": STR,
                    "source": STR,  # absolute path of the inventory file in force
                    "nodes": INT,
                    "roles": {"type": "object", "additionalProperties": INT},
                    "gpu_nodes": INT,
                    "frontends": {"type": "array", "items": STR},
                    "listen": {"type": "object", "additionalProperties": STR},
                    "dhcp_mode": STR,
                    "after_install": STR,
                }
            ),
        },
        {
            # Only with the inventory's `ha` block: this member, the leader, etcd's health.
            "ha": _obj(
                {
                    "member": STR,
                    "address": STR,
                    "members": {"type": "array", "items": STR},
                    "leader": _nullable(STR),
                    "leading": {"type": "boolean"},
                    "since": _nullable(TIME),
                    "last_keepalive": _nullable(TIME),
                    "etcd": _obj(
                        {
                            "ok": {"type": "boolean"},
                            "error": _nullable(STR),
                            "endpoints": {"type": "object", "additionalProperties": ANY_OBJ},
                            "latency_ms": {"type": "object", "additionalProperties": ANY_OBJ},
                        }
                    ),
                    "leader_changes": INT,
                    "elected": INT,
                    "step_downs": {"type": "object", "additionalProperties": INT},
                    "floating": {"type": "array", "items": STR},
                    "floating_error": _nullable(STR),
                    "lease_ttl": INT,
                }
            )
        },
    ),
    "Lease": _obj(
        {
            "mac": STR,
            "ip": STR,
            "hostname": _nullable(STR),
            "node": _nullable(STR),
            "state": {"type": "string", "enum": ["offered", "bound", "declined", "released"]},
            "expires": TIME,
            "expires_in": NUM,
            "updated": TIME,
        }
    ),
    "LeaseList": _obj({"time": TIME, "leases": {"type": "array", "items": _ref("Lease")}}),
    "UnknownMachines": _obj(
        {
            "total": {**INT, "description": "machines listed (at most 4096 are kept)"},
            "evicted": {
                **INT,
                "description": "machines dropped from the list to keep it bounded, the "
                "least recently seen first",
            },
            "limit": INT,
            "offset": INT,
            "machines": {
                "type": "array",
                "items": _obj(
                    {
                        "mac": STR,
                        "first_seen": TIME,
                        "last_seen": TIME,
                        "seen": {**INT, "description": "DHCP requests seen from it"},
                        "vendor_class": STR,
                        "arch": STR,
                        "user_class": STR,
                        "hostname": STR,
                        "arch_name": {
                            **STR,
                            "description": "bios, uefi-x64, uefi-arm64... (option 93, or "
                            "the PXE vendor class); empty when unknown",
                        },
                        "closest": {
                            "type": "array",
                            "description": "inventory nodes whose MAC differs in 1 or 2 hex "
                            "digits (the nearest; ties in inventory order): a likely typo",
                            "items": _obj(
                                {
                                    "index": INT,
                                    "key": STR,
                                    "name": STR,
                                    "mac": STR,
                                    "distance": INT,
                                }
                            ),
                        },
                    }
                ),
            },
        }
    ),
    "Backend": _obj(
        {
            "name": STR,
            "address": STR,
            "health": {"type": "string", "enum": ["unknown", "up", "down"]},
            "admin": {"type": "string", "enum": ["enabled", "drain", "disabled"]},
            "removed": BOOL,
            "active": INT,
            "total": INT,
            "failures": INT,
            "bytes_in": INT,
            "bytes_out": INT,
            "checks": {
                "type": "array",
                "items": _obj({"time": TIME, "ok": BOOL, "detail": STR}),
            },
        },
        {
            "self_loop": {
                **_nullable(STR),
                "description": "why the backend is refused: it is one of the proxy's own "
                "listeners (kept down, not probed)",
            }
        },
    ),
    "Frontend": _obj(
        {
            "listen": _nullable(STR),
            "active": INT,
            "balance": STR,
            "counters": {"type": "object", "additionalProperties": INT},
            "backends": {"type": "array", "items": _ref("Backend")},
        },
        {
            "limits": {
                "type": "object",
                "additionalProperties": INT,
                "description": "connection caps: cap, floor (guaranteed), per_client; clients",
            },
            "check": {
                **ANY_OBJ,
                "description": "the health check: kind (tcp/http/https), port (null: the "
                "backend's own), path, interval (s)",
            },
        },
    ),
    "Backends": _obj(
        {
            "running": BOOL,
            "frontends": {"type": "object", "additionalProperties": _ref("Frontend")},
        },
        {
            "splice": BOOL,
            "descriptors": {
                "type": "object",
                "additionalProperties": INT,
                "description": "open-files limit, reserve kept for the rest of the daemon, "
                "the proxy's budget and what it holds (in_use, pipes, shared pool)",
            },
        },
    ),
    "BackendResult": _obj({"ok": BOOL, "backend": _ref("Backend")}),
    "CsrDecisions": _obj(
        {
            "counts": {"type": "object", "additionalProperties": INT},
            "decisions": {
                "type": "array",
                "items": _obj(
                    {
                        "id": INT,
                        "time": TIME,
                        "csr": STR,
                        "uid": STR,
                        "kind": STR,
                        "node": STR,
                        "requestor": STR,
                        "decision": {"type": "string", "enum": ["approve", "pending", "deny"]},
                        "reason": STR,
                    }
                ),
            },
        }
    ),
    "Cluster": _obj(
        {
            "running": BOOL,
            "service": _nullable(ANY_OBJ),
            "gpu": {"nullable": True, "description": "the GPU bring-up state kept in the store"},
            "bootstrap": {"nullable": True, "description": "the bootstrap state in the store"},
        }
    ),
    "ReloadResult": _obj(
        {
            "ok": BOOL,
            "errors": {"type": "array", "items": STR},
            "changed": {"type": "array", "items": STR},
            # What the new plan changed (plandiff); empty when refused.
            "diff": _obj({"summary": STR, "lines": {"type": "array", "items": STR}}),
        }
    ),
    "ReinstallResult": _obj(
        {"ok": BOOL, "node": STR, "next_boot": {"type": "string", "enum": ["install"]}}
    ),
}


def _json(schema: str, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _err(description: str) -> Schema:
    return _json("Error", description)


UNAUTHORIZED = _err("no token, or a wrong one")
BAD = _err("a bad parameter")
READ: list[dict[str, list[str]]] = [
    {},
    {"bearer": []},
    {"accessToken": []},
]  # open on loopback; a token elsewhere
MUTATE: list[dict[str, list[str]]] = [{"bearer": []}]


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _path(name: str, description: str, schema: Schema | None = None) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": schema or {"type": "string"},
        "description": description,
    }


BOOL_QUERY: Schema = {"type": "boolean"}


def _get(
    summary: str,
    schema: str,
    *,
    params: list[Schema] | None = None,
    extra: dict[str, Schema] | None = None,
) -> Schema:
    responses: dict[str, Schema] = {"200": _json(schema, summary), "401": UNAUTHORIZED}
    if params:
        responses["400"] = BAD
    responses.update(extra or {})
    op: Schema = {"summary": summary, "security": READ, "responses": responses}
    if params:
        op["parameters"] = params
    return {"get": op}


def _paths() -> dict[str, Schema]:
    node_404 = {"404": _err("no such node in the inventory")}
    return {
        "/": {
            "get": {
                "summary": "The dashboard: every node's install progress, live",
                "security": [{}],
                "responses": {
                    "200": {"description": "the page", "content": {"text/html": {"schema": STR}}}
                },
            }
        },
        "/dashboard/{file}": {
            "get": {
                "summary": "The dashboard's script and style sheet",
                "security": [{}],
                "parameters": [
                    _path(
                        "file",
                        "a file of the page",
                        {"type": "string", "enum": ["app.js", "style.css"]},
                    )
                ],
                "responses": {
                    "200": {
                        "description": "the file",
                        "content": {
                            "text/javascript": {"schema": STR},
                            "text/css": {"schema": STR},
                        },
                    },
                    "404": _err("no such file"),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness: the admin endpoint answers",
                "security": [{}],
                "responses": {
                    "200": {"description": "ok", "content": {"text/plain": {"schema": STR}}}
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text exposition format)",
                "security": READ,
                "responses": {
                    "200": {
                        "description": "the metrics",
                        "content": {"text/plain": {"schema": STR}},
                    },
                    "401": UNAUTHORIZED,
                },
            }
        },
        "/api/v1/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [{}],
                "responses": {
                    "200": {
                        "description": "OpenAPI 3",
                        "content": {"application/json": {"schema": ANY_OBJ}},
                    }
                },
            }
        },
        "/api/v1/status": _get("Services, plan summary, uptime, reloads", "Status"),
        "/api/v1/plan": {
            "get": {
                "summary": "The derived plan every service reads",
                "security": READ,
                "responses": {
                    "200": {
                        "description": "the plan",
                        "content": {"application/json": {"schema": ANY_OBJ}},
                    },
                    "401": UNAUTHORIZED,
                },
            }
        },
        "/api/v1/nodes": _get("Every node with its stages and their times", "NodeList"),
        "/api/v1/nodes/{name}": {
            "get": {
                "summary": "One node, its timeline and its events (oldest first)",
                "security": READ,
                "parameters": [
                    _path("name", "a node of the inventory"),
                    _query("after", EVENT_ID, "events after this id"),
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 5000, "default": 500},
                        "at most this many events",
                    ),
                ],
                "responses": {
                    "200": _json("NodeDetail", "the node"),
                    "400": BAD,
                    "401": UNAUTHORIZED,
                    **node_404,
                },
            }
        },
        "/api/v1/nodes/{name}/reinstall": {
            "post": {
                "summary": "Install the node again at its next network boot",
                "security": MUTATE,
                "parameters": [_path("name", "a node of the inventory")],
                "responses": {
                    "200": _json("ReinstallResult", "recorded"),
                    "401": UNAUTHORIZED,
                    **node_404,
                },
            }
        },
        "/api/v1/leases": _get(
            "DHCP leases (unexpired unless all=true)",
            "LeaseList",
            params=[_query("all", BOOL_QUERY, "include expired leases")],
        ),
        "/api/v1/unknown-machines": _get(
            "Machines that network-booted here but are not in the inventory, the most "
            "recently seen first, a page at a time",
            "UnknownMachines",
            params=[
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                    "at most this many machines",
                ),
                _query(
                    "offset",
                    {"type": "integer", "minimum": 0, "maximum": 10**9, "default": 0},
                    "skip this many first",
                ),
            ],
        ),
        "/api/v1/backends": _get("Load-balancer frontends and backends with health", "Backends"),
        "/api/v1/frontends/{frontend}/backends/{backend}/{action}": {
            "post": {
                "summary": "Drain, disable or enable one backend of one frontend",
                "description": "drain: no new connections; disable: none at all (open ones "
                "are closed); enable: back in the pool.",
                "security": MUTATE,
                "parameters": [
                    _path("frontend", "api, machine_config, ingress_http or ingress_https"),
                    _path("backend", "a backend (node) name"),
                    _path(
                        "action",
                        "what to do",
                        {"type": "string", "enum": ["drain", "disable", "enable"]},
                    ),
                ],
                "responses": {
                    "200": _json("BackendResult", "the backend after the change"),
                    "401": UNAUTHORIZED,
                    "404": _err("no such frontend, backend or action, or no load balancer running"),
                },
            }
        },
        "/api/v1/csr-decisions": _get(
            "The newest CSR decisions of the cluster loop, newest first, and counts",
            "CsrDecisions",
            params=[
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 5000, "default": 100},
                    "at most this many decisions",
                )
            ],
        ),
        "/api/v1/cluster": _get("The cluster loop: GPU bring-up, bootstrap, status", "Cluster"),
        "/api/v1/events": {
            "get": {
                "summary": "Node events as Server-Sent Events",
                "description": "Each event is `event: stage`, `id: <store id>` and a JSON "
                "Event as data. Without Last-Event-ID or `after`, the newest `backlog` events "
                "come first; then live events. Comments (`: keep-alive`) keep idle streams "
                "open. EventSource reconnects with Last-Event-ID and misses nothing.",
                "security": READ,
                "parameters": [
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
                        "description": "resume after this event id",
                    },
                    _query("after", EVENT_ID, "resume after this id"),
                    _query(
                        "backlog",
                        {"type": "integer", "minimum": 0, "maximum": 1000, "default": 100},
                        "stored events sent first to a new client",
                    ),
                    _query(
                        "follow",
                        {"type": "boolean", "default": True},
                        "false: send what is stored and close",
                    ),
                    _query("node", STR, "only this node's events"),
                    _query(
                        "keepalive",
                        {"type": "number", "minimum": 0.1, "maximum": 300, "default": 15},
                        "seconds between keep-alive comments",
                    ),
                ],
                "responses": {
                    "200": {
                        "description": "the stream; each event's data is a JSON Event",
                        "content": {"text/event-stream": {"schema": SSE_EVENT}},
                    },
                    "400": BAD,
                    "401": UNAUTHORIZED,
                    **node_404,
                },
            }
        },
        "/api/v1/reload": {
            "post": {
                "summary": "Re-read the inventory and swap the plan (as SIGHUP does)",
                "security": MUTATE,
                "responses": {
                    "200": _json("ReloadResult", "the new plan is in force"),
                    "401": UNAUTHORIZED,
                    "422": _json("ReloadResult", "refused: the running plan stays"),
                    "503": _err("no supervisor"),
                },
            }
        },
    }


@cache
def _document() -> Schema:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "appliance admin API",
            "version": __version__,
            "description": "Status, node install progress, leases, load balancer, CSR "
            "decisions and GPU bring-up of one appliance. Reads are open when the endpoint "
            "listens on loopback and need the token otherwise; mutations always need it. "
            'The token is in <state_dir>/admin.token. Errors are {"error": "..."}; an '
            "unknown path is 404 and a wrong method 405, both with that body.",
        },
        "servers": [{"url": "/"}],
        "paths": _paths(),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "accessToken": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "access_token",
                    "description": "the token for GET requests that cannot send headers "
                    "(EventSource)",
                },
            },
        },
    }


def document() -> Schema:
    """The document (a fresh copy: callers may change it)."""
    return copy.deepcopy(_document())
