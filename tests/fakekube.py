"""A fake kube-apiserver for the cluster loop's tests (aiohttp, HTTPS, token auth).

No kube-apiserver can run here, so this stands in for it, faithful in what the
cluster loop relies on:
- one cluster-wide resourceVersion counter; every write bumps it and is kept in an
  event history that watches replay (`?watch=true&resourceVersion=N`: the events
  after N, then live ones; N = "" or "0": the current objects as ADDED first);
- a watch from a compacted (too old) resourceVersion gets the 410 Expired ERROR
  event, as does every open watch when the test calls `expire_watches()`;
- `timeoutSeconds` ends a watch; fieldSelector metadata.name / metadata.namespace;
- 409 AlreadyExists on creating an existing object, 409 Conflict on a PUT whose
  metadata.resourceVersion is stale; 404 for unknown objects and for kinds whose CRD
  is not installed (the test installs them, as OLM would); 404 creating in a missing
  namespace; 401 without the bearer token;
- CertificateSigningRequests (certificates.k8s.io/v1) with the /approval subresource
  (only status.conditions taken; Approved and Denied exclusive, 422 otherwise),
  Nodes, ConfigMaps, Namespaces, Pods with phases and /log, OperatorGroups,
  Subscriptions and CSVs (operators.coreos.com) with phases, NodeFeatureDiscovery,
  ClusterPolicy with status.state, and operator.openshift.io Etcd;
- RBAC as the API server enforces it: the admin token (system:masters) may do
  anything; every other identity (a ServiceAccount token, filled into its
  kubernetes.io/service-account-token Secret as the token controller does) only what
  its ClusterRoleBindings and RoleBindings grant (verbs, API groups, resources,
  subresources, resourceNames incl. list/watch by fieldSelector metadata.name), with
  the apiserver's 403 Status; approving a CSR also needs `approve` on
  `signers/<signerName>` (the CertificateApproval admission check).
The test plays the cluster's controllers (kubelet, OLM, NFD, the GPU operator) with
the methods below: set a CSV phase, label a node, end a pod with a log, ...
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import ipaddress
import json
import socket
import ssl
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from aiohttp.typedefs import Handler
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HISTORY = 10_000  # events kept for watches; older ones are compacted (410)


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


KINDS = [
    Kind("", "v1", "namespaces", "Namespace", False),
    Kind("", "v1", "nodes", "Node", False),
    Kind("", "v1", "configmaps", "ConfigMap", True),
    Kind("", "v1", "pods", "Pod", True),
    Kind(
        "certificates.k8s.io",
        "v1",
        "certificatesigningrequests",
        "CertificateSigningRequest",
        False,
    ),
    Kind("operators.coreos.com", "v1", "operatorgroups", "OperatorGroup", True),
    Kind("operators.coreos.com", "v1alpha1", "subscriptions", "Subscription", True),
    Kind(
        "operators.coreos.com", "v1alpha1", "clusterserviceversions", "ClusterServiceVersion", True
    ),
    Kind("nfd.openshift.io", "v1", "nodefeaturediscoveries", "NodeFeatureDiscovery", True),
    Kind("nvidia.com", "v1", "clusterpolicies", "ClusterPolicy", False),
    Kind("operator.openshift.io", "v1", "etcds", "Etcd", False),
    Kind("", "v1", "serviceaccounts", "ServiceAccount", True),
    Kind("", "v1", "secrets", "Secret", True),
    Kind("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    Kind("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    Kind("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    Kind("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
]
BY_KIND = {k.kind: k for k in KINDS}
BY_PATH = {(k.group, k.version, k.plural): k for k in KINDS}
BY_PLURAL = {k.plural: k for k in KINDS}
# Built in, or installed with the cluster (OLM is part of OpenShift); the rest are CRDs
# that appear when their operator is installed.
SERVED = {"namespaces", "nodes", "configmaps", "pods", "certificatesigningrequests"}
SERVED |= {"operatorgroups", "subscriptions", "clusterserviceversions"}
SERVED |= {"serviceaccounts", "secrets", "clusterroles", "clusterrolebindings", "roles"}
SERVED |= {"rolebindings"}
SA_TOKEN = "kubernetes.io/service-account-token"
ADMIN = ("system:admin", ("system:masters", "system:authenticated"))
Identity = tuple[str, tuple[str, ...]]  # user, groups
# Subscripted: a tuple alias is not a class, so it cannot be the second argument.
IDENTITY = web.RequestKey[Identity]("identity")
INITIAL_NAMESPACES = ("default", "kube-system", "openshift-marketplace")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class ApiError(Exception):
    def __init__(
        self, code: int, reason: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details = details

    def response(self) -> web.Response:
        body = status_body(self.code, self.reason, self.message)
        if self.details is not None:
            body["details"] = self.details
        return web.json_response(body, status=self.code)


@dataclass(frozen=True)
class Request:
    """What the authorizer is asked about one request (the apiserver's attributes)."""

    user: str
    groups: tuple[str, ...]
    verb: str
    group: str
    resource: str
    subresource: str = ""
    namespace: str = ""
    name: str = ""


def rule_allows(rule: dict[str, Any], req: Request) -> bool:
    """One PolicyRule against one request, as the RBAC authorizer matches them."""
    verbs = rule.get("verbs") or []
    if "*" not in verbs and req.verb not in verbs:
        return False
    groups = rule.get("apiGroups") or []
    if "*" not in groups and req.group not in groups:
        return False
    resources = rule.get("resources") or []
    full = f"{req.resource}/{req.subresource}" if req.subresource else req.resource
    if not (
        "*" in resources
        or full in resources
        or (req.subresource and f"*/{req.subresource}" in resources)
    ):
        return False
    names = rule.get("resourceNames") or []
    return not names or (bool(req.name) and req.name in names)


def forbidden(req: Request, prefix: str | None = None) -> ApiError:
    """The apiserver's 403: `etcds.operator.openshift.io "cluster" is forbidden: User ...`."""
    resource = f"{req.resource}/{req.subresource}" if req.subresource else req.resource
    where = f'in the namespace "{req.namespace}"' if req.namespace else "at the cluster scope"
    why = (
        f'User "{req.user}" cannot {req.verb} resource "{resource}" in API group '
        f'"{req.group}" {where}'
    )
    qualified = f"{req.resource}.{req.group}" if req.group else req.resource
    if prefix is None:
        prefix = f'{qualified} "{req.name}"' if req.name else qualified
    details: dict[str, Any] = {"group": req.group, "kind": req.resource}
    if req.name:
        details["name"] = req.name
    return ApiError(403, "Forbidden", f"{prefix} is forbidden: {why}", details)


@dataclass
class _Watch:
    kind: str
    namespace: str | None
    selector: dict[str, str]
    queue: asyncio.Queue[tuple[int, str, dict[str, Any]] | None]


def _tls(tmp: Path) -> tuple[ssl.SSLContext, bytes]:
    """A CA and a server certificate for 127.0.0.1; returns the server context and the CA PEM."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kube-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    cert_file, key_file = tmp / "apiserver.crt", tmp / "apiserver.key"
    cert_file.write_bytes(cert.public_bytes(pem))
    key_file.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx, ca.public_bytes(pem)


class FakeKube:
    """The fake API server. `await start()`, write `kubeconfig()`, drive it, `await stop()`."""

    def __init__(self, workdir: Path, token: str = "fake-token") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.ssl, self.ca_pem = _tls(workdir)
        self.rv = 1000
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.history: list[tuple[int, str, str, dict[str, Any]]] = []
        self.compacted = 0  # a watch must start after this version
        self.served = set(SERVED)
        self.watches: list[_Watch] = []
        self.logs: dict[tuple[str, str], str] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.approval_puts: Counter[str] = Counter()  # successful approval PUTs per CSR
        self.approved: Counter[str] = Counter()  # transitions to Approved per CSR
        self.list_delay: dict[str, float] = {}  # plural -> seconds a list takes (a slow API)
        # token -> (user, groups); the admin token is in system:masters (no RBAC check).
        self.identities: dict[str, tuple[str, tuple[str, ...]]] = {token: ADMIN}
        self.refused: list[Request] = []  # every request answered 403
        self.runner: web.AppRunner | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        for ns in INITIAL_NAMESPACES:
            self.put("namespaces", {"metadata": {"name": ns}, "status": {"phase": "Active"}})

    # --- serving --------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def start(self, port: int = 0) -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port or self.port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self.runner = web.AppRunner(
            self._app(), access_log=None, handle_signals=False, shutdown_timeout=0.1
        )
        await self.runner.setup()
        await web.SockSite(self.runner, sock, ssl_context=self.ssl).start()
        return self.url

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """Stop listening and cut every open connection (an outage, or the end)."""
        for w in self.watches:
            w.queue.put_nowait(None)
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def resume(self) -> None:
        """Listen again on the same port after `stop()`."""
        await self.start(self.port)

    def kubeconfig(self, path: Path, token: str | None = None) -> Path:
        """A kubeconfig for the admin (or for the identity of `token`)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "fake",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(self.ca_pem).decode(),
                    },
                }
            ],
            "users": [{"name": "admin", "user": {"token": token or self.token}}],
            "contexts": [{"name": "admin", "context": {"cluster": "fake", "user": "admin"}}],
            "current-context": "admin",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        return path

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        auth = request.headers.get("Authorization", "")
        identity = self.identities.get(auth.removeprefix("Bearer ")) if auth else None
        if not auth.startswith("Bearer ") or identity is None:
            return ApiError(401, "Unauthorized", "Unauthorized").response()
        request[IDENTITY] = identity
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()

    # --- the store ------------------------------------------------------------------------

    def _bump(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _emit(self, event: str, plural: str, obj: dict[str, Any]) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        snapshot = copy.deepcopy(obj)
        self.history.append((rv, event, plural, snapshot))
        if len(self.history) > HISTORY:
            dropped = self.history[: len(self.history) - HISTORY]
            self.history = self.history[-HISTORY:]
            self.compacted = max(self.compacted, dropped[-1][0])
        for w in self.watches:
            if w.kind == plural and self._matches(w, snapshot):
                w.queue.put_nowait((rv, event, snapshot))

    @staticmethod
    def _matches(w: _Watch, obj: dict[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        if w.namespace is not None and meta.get("namespace") != w.namespace:
            return False
        for field, value in w.selector.items():
            if str(meta.get(field.removeprefix("metadata."))) != value:
                return False
        return True

    def put(self, plural: str, obj: dict[str, Any], event: str | None = None) -> dict[str, Any]:
        """Create or overwrite an object as a controller would (no checks); emits its event."""
        kind = BY_PLURAL[plural]
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        key = (plural, meta.get("namespace", "") if kind.namespaced else "", meta["name"])
        old = self.objects.get(key)
        obj.setdefault("apiVersion", kind.api_version)
        obj.setdefault("kind", kind.kind)
        meta.setdefault("uid", old["metadata"]["uid"] if old else str(uuid.uuid4()))
        meta.setdefault(
            "creationTimestamp", old["metadata"]["creationTimestamp"] if old else _now()
        )
        if plural == "secrets" and obj.get("type") == SA_TOKEN:
            self._token_controller(obj)
        meta["resourceVersion"] = self._bump()
        self.objects[key] = obj
        self._emit(event or ("MODIFIED" if old else "ADDED"), plural, obj)
        return copy.deepcopy(obj)  # the caller's copy: changing it changes nothing here

    def get(self, plural: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        found = self.objects.get((plural, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def items(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(o)
            for (p, ns, _), o in sorted(self.objects.items())
            if p == plural and (namespace is None or ns == namespace)
        ]

    def remove(self, plural: str, name: str, namespace: str = "") -> None:
        obj = self.objects.pop((plural, namespace, name))
        obj["metadata"]["resourceVersion"] = self._bump()
        self._emit("DELETED", plural, obj)

    def count(self, method: str, path_end: str) -> int:
        """Requests so far with this method to a path ending in `path_end`."""
        return sum(1 for m, p in self.requests if m == method and p.endswith(path_end))

    # --- what the test does as the cluster's controllers --------------------------------

    def expire_watches(self) -> None:
        """Compact history to now: open watches get 410 and old versions can't resume."""
        self.compacted = self.rv
        self.history.clear()
        for w in self.watches:
            w.queue.put_nowait(
                (0, "ERROR", status_body(410, "Expired", "too old resource version (compacted)"))
            )

    def service_account_token(self, namespace: str, name: str) -> str:
        """A token for a ServiceAccount (as `oc create token` gives one)."""
        token = f"sa-{uuid.uuid4().hex}"
        user = f"system:serviceaccount:{namespace}:{name}"
        groups = ("system:serviceaccounts", f"system:serviceaccounts:{namespace}")
        self.identities[token] = (user, (*groups, "system:authenticated"))
        return token

    def _token_controller(self, secret: dict[str, Any]) -> None:
        """Fill a service-account-token Secret with a token of its ServiceAccount."""
        data = secret.setdefault("data", {})
        if data.get("token"):
            return
        meta = secret["metadata"]
        account = (meta.get("annotations") or {}).get("kubernetes.io/service-account.name")
        if not account:
            return
        namespace = meta.get("namespace", "")
        token = self.service_account_token(namespace, account)
        for key, value in (("token", token.encode()), ("ca.crt", self.ca_pem)):
            data[key] = base64.b64encode(value).decode()
        data["namespace"] = base64.b64encode(namespace.encode()).decode()

    def apply(self, documents: Iterable[dict[str, Any]]) -> None:
        """Create or replace each object, as `kubectl apply -f -` does with a stream."""
        for doc in documents:
            kind = BY_KIND[doc["kind"]]
            assert doc.get("apiVersion") == kind.api_version, doc
            namespace = (doc.get("metadata") or {}).get("namespace")
            if kind.namespaced:
                assert namespace, f"{doc['kind']} without a namespace"
                assert ("namespaces", "", namespace) in self.objects, f"no namespace {namespace}"
            self.put(kind.plural, doc)

    # --- RBAC -----------------------------------------------------------------------------

    def _rules(self, req: Request) -> list[dict[str, Any]]:
        """Every rule bound to the request's user (cluster-wide, and in its namespace)."""
        rules: list[dict[str, Any]] = []
        bindings = [("clusterrolebindings", b) for b in self.items("clusterrolebindings")]
        if req.namespace:
            bindings += [("rolebindings", b) for b in self.items("rolebindings", req.namespace)]
        for plural, binding in bindings:
            if not any(self._subject(s, req) for s in binding.get("subjects") or []):
                continue
            ref = binding.get("roleRef") or {}
            if ref.get("kind") == "ClusterRole":
                role = self.get("clusterroles", str(ref.get("name")))
            elif ref.get("kind") == "Role" and plural == "rolebindings":
                role = self.get("roles", str(ref.get("name")), req.namespace)
            else:
                role = None
            rules += [r for r in (role or {}).get("rules") or [] if isinstance(r, dict)]
        return rules

    @staticmethod
    def _subject(subject: dict[str, Any], req: Request) -> bool:
        kind, name = subject.get("kind"), subject.get("name")
        if kind == "ServiceAccount":
            return req.user == f"system:serviceaccount:{subject.get('namespace')}:{name}"
        if kind == "User":
            return req.user == name
        return kind == "Group" and name in req.groups

    def allowed(self, req: Request) -> bool:
        if "system:masters" in req.groups:
            return True
        return any(rule_allows(rule, req) for rule in self._rules(req))

    def _authorize(self, req: Request, prefix: str | None = None) -> None:
        if not self.allowed(req):
            self.refused.append(req)
            raise forbidden(req, prefix)

    def serve_kind(self, plural: str) -> None:
        """Install a CRD (NFD, ClusterPolicy, Etcd): its kind is served from now on."""
        self.served.add(plural)

    def add_node(
        self, name: str, *, ready: bool = False, labels: dict[str, str] | None = None
    ) -> dict[str, Any]:
        return self.put(
            "nodes",
            {
                "metadata": {
                    "name": name,
                    "labels": {"kubernetes.io/hostname": name, **(labels or {})},
                },
                "status": {"conditions": [_ready(ready)]},
            },
        )

    def set_allocatable_gpus(self, name: str, gpus: int) -> None:
        """The device plugin advertises `gpus` nvidia.com/gpu on the node."""
        node = self.get("nodes", name)
        assert node is not None
        node["status"]["allocatable"] = {"cpu": "64", "nvidia.com/gpu": str(gpus)}
        self.put("nodes", node)

    def set_node_ready(self, name: str, ready: bool) -> None:
        node = self.get("nodes", name)
        assert node is not None
        node["status"]["conditions"] = [_ready(ready)]
        self.put("nodes", node)

    def label_node(self, name: str, labels: dict[str, str]) -> None:
        node = self.get("nodes", name)
        assert node is not None
        node["metadata"].setdefault("labels", {}).update(labels)
        self.put("nodes", node)

    def create_csr(
        self,
        name: str,
        pem: bytes,
        *,
        signer: str,
        usages: Iterable[str],
        username: str,
        groups: Iterable[str],
        expiration: int | None = None,
    ) -> dict[str, Any]:
        """A CSR as a client authenticated as `username` in `groups` would create it (the
        API server fills spec.username and spec.groups from the authentication)."""
        spec: dict[str, Any] = {
            "request": base64.b64encode(pem).decode(),
            "signerName": signer,
            "usages": list(usages),
            "username": username,
            "groups": list(groups),
        }
        if expiration is not None:
            spec["expirationSeconds"] = expiration
        return self.put(
            "certificatesigningrequests", {"metadata": {"name": name}, "spec": spec, "status": {}}
        )

    def set_configmap(self, namespace: str, name: str, data: dict[str, str]) -> None:
        self.put("configmaps", {"metadata": {"name": name, "namespace": namespace}, "data": data})

    def olm_resolve(
        self,
        namespace: str,
        package: str,
        csv: str,
        *,
        phase: str = "Installing",
        alm_examples: list[dict[str, Any]] | None = None,
        crds: Iterable[str] = (),
    ) -> None:
        """OLM's work: resolve the Subscription to a CSV and install it (phase given)."""
        sub = self.get("subscriptions", package, namespace)
        assert sub is not None, f"no Subscription {namespace}/{package}"
        sub["status"] = {"currentCSV": csv, "installedCSV": csv, "state": "AtLatestKnown"}
        self.put("subscriptions", sub)
        annotations = {"alm-examples": json.dumps(alm_examples or [])}
        self.put(
            "clusterserviceversions",
            {
                "metadata": {"name": csv, "namespace": namespace, "annotations": annotations},
                "spec": {"displayName": package},
                "status": {"phase": phase},
            },
        )
        for plural in crds:
            self.serve_kind(plural)

    def set_csv_phase(self, namespace: str, csv: str, phase: str) -> None:
        obj = self.get("clusterserviceversions", csv, namespace)
        assert obj is not None
        obj["status"] = {"phase": phase}
        self.put("clusterserviceversions", obj)

    def set_policy_state(self, name: str, state: str) -> None:
        obj = self.get("clusterpolicies", name)
        assert obj is not None
        obj["status"] = {"state": state}
        self.put("clusterpolicies", obj)

    def set_pod_phase(self, namespace: str, name: str, phase: str, log: str | None = None) -> None:
        obj = self.get("pods", name, namespace)
        assert obj is not None, f"no pod {namespace}/{name}"
        obj["status"] = {"phase": phase}
        self.put("pods", obj)
        if log is not None:
            self.logs[(namespace, name)] = log

    # --- the HTTP side --------------------------------------------------------------------

    def _route(self, path: str) -> tuple[Kind, str | None, str | None, str]:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource {path}"
            )
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            inner = BY_PATH.get((group, version, rest[2]))
            if inner is not None and inner.namespaced:
                namespace, rest = rest[1], rest[2:]
        if not rest:
            raise ApiError(404, "NotFound", f"no resource at {path}")
        kind = BY_PATH.get((group, version, rest[0]))
        if kind is None or kind.plural not in self.served:
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource {path}"
            )
        if kind.namespaced and namespace is None and len(rest) > 1:
            raise ApiError(404, "NotFound", f"{kind.plural} is namespaced")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else ""
        return kind, namespace, name, sub

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/version":
            return web.json_response({"major": "1", "minor": "29", "gitVersion": "v1.29.0-fake"})
        discovery = self._discovery(request.path)
        if discovery is not None:  # system:discovery: any authenticated user may read it
            return web.json_response(discovery)
        # Authorized before routing, as the apiserver's filter chain does: a kind that
        # is not served is still a 403, not a 404, for whom RBAC does not allow it.
        self._authorize(self._request(request))
        kind, namespace, name, sub = self._route(request.path)
        method = request.method
        if name is None:
            if method == "GET":
                selector = self._selector(request.query.get("fieldSelector", ""))
                if request.query.get("watch") in ("true", "1"):
                    return await self._watch(request, kind, namespace, selector)
                await asyncio.sleep(self.list_delay.get(kind.plural, 0.0))
                return self._list(kind, namespace, selector)
            if method == "POST":
                return self._create(kind, namespace, await self._body(request))
            raise ApiError(405, "MethodNotAllowed", f"{method} on a collection")
        key = (kind.plural, namespace or "", name)
        if method == "GET" and sub == "log" and kind.plural == "pods":
            return self._log(key)
        if sub and sub not in ("approval", "status"):
            raise ApiError(404, "NotFound", f"no subresource {sub}")
        if method == "GET":
            obj = self.objects.get(key)
            if obj is None:
                raise ApiError(404, "NotFound", f'{kind.plural} "{name}" not found')
            return web.json_response(obj)
        if method == "PUT":
            return self._replace(kind, key, sub, await self._body(request), request[IDENTITY])
        if method == "DELETE":
            if key not in self.objects:
                raise ApiError(404, "NotFound", f'{kind.plural} "{name}" not found')
            obj = copy.deepcopy(self.objects[key])
            self.remove(kind.plural, name, namespace or "")
            self.logs.pop((namespace or "", name), None)
            return web.json_response(obj)
        raise ApiError(405, "MethodNotAllowed", method)

    def _discovery(self, path: str) -> dict[str, Any] | None:
        """/api, /apis and the resource lists, for kubectl (legacy discovery)."""
        served = [k for k in KINDS if k.plural in self.served]
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if path == "/apis":
            groups: dict[str, list[str]] = {}
            for k in served:
                if k.group and k.version not in groups.setdefault(k.group, []):
                    groups[k.group].append(k.version)
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": g,
                        "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                        "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]},
                    }
                    for g, vs in groups.items()
                ],
            }
        parts = [p for p in path.split("/") if p]
        if parts == ["api", "v1"]:
            group, version = "", "v1"
        elif len(parts) == 3 and parts[0] == "apis":
            group, version = parts[1], parts[2]
        else:
            return None
        kinds = [k for k in served if (k.group, k.version) == (group, version)]
        if not kinds:
            return None
        verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": [
                {
                    "name": k.plural,
                    "singularName": k.kind.lower(),
                    "namespaced": k.namespaced,
                    "kind": k.kind,
                    "verbs": verbs,
                }
                for k in kinds
            ],
        }

    @staticmethod
    def _request(request: web.Request) -> Request:
        """The attributes of a resource request, from its path alone."""
        user, groups = request[IDENTITY]
        parts = [p for p in request.path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, rest = "", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, rest = parts[1], parts[3:]
        else:
            raise ApiError(404, "NotFound", f"the server could not find {request.path}")
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        if not rest:
            raise ApiError(404, "NotFound", f"no resource at {request.path}")
        resource, name = rest[0], rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        method = request.method
        if method == "GET":
            watch = request.query.get("watch") in ("true", "1")
            verb = "get" if name else ("watch" if watch else "list")
        else:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, "delete")
        if not name and verb in ("list", "watch"):
            # metadata.name=<name> in the fieldSelector makes a list/watch of that name.
            for term in request.query.get("fieldSelector", "").split(","):
                field, _, value = term.partition("=")
                if field == "metadata.name":
                    name = value.lstrip("=")
        return Request(user, groups, verb, group, resource, sub, namespace, name)

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "BadRequest", "the body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body is not an object")
        return body

    @staticmethod
    def _selector(text: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for term in filter(None, text.split(",")):
            field, _, value = term.partition("=")
            if field not in ("metadata.name", "metadata.namespace"):
                raise ApiError(400, "BadRequest", f'field label not supported: "{field}"')
            out[field] = value.lstrip("=")
        return out

    def _list(self, kind: Kind, namespace: str | None, selector: dict[str, str]) -> web.Response:
        w = _Watch(kind.plural, namespace, selector, asyncio.Queue())
        items = [o for o in self.items(kind.plural, namespace) if self._matches(w, o)]
        return web.json_response(
            {
                "kind": f"{kind.kind}List",
                "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": str(self.rv)},
                "items": items,
            }
        )

    def _create(self, kind: Kind, namespace: str | None, body: dict[str, Any]) -> web.Response:
        meta = body.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        if kind.namespaced:
            if namespace is None:
                raise ApiError(404, "NotFound", f"{kind.plural} is namespaced")
            if meta.get("namespace", namespace) != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the object does not match")
            if ("namespaces", "", namespace) not in self.objects:
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')
            meta["namespace"] = namespace
        key = (kind.plural, namespace or "", name)
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f'{kind.plural} "{name}" already exists')
        if kind.plural == "pods":
            if not (body.get("spec") or {}).get("containers"):
                raise ApiError(422, "Invalid", "spec.containers: Required value")
            body["status"] = {"phase": "Pending"}
        meta.pop("resourceVersion", None)
        meta.pop("uid", None)
        return web.json_response(self.put(kind.plural, body, "ADDED"), status=201)

    def _replace(
        self,
        kind: Kind,
        key: tuple[str, str, str],
        sub: str,
        body: dict[str, Any],
        identity: tuple[str, tuple[str, ...]] = ADMIN,
    ) -> web.Response:
        old = self.objects.get(key)
        if old is None:
            raise ApiError(404, "NotFound", f'{kind.plural} "{key[2]}" not found')
        given = (body.get("metadata") or {}).get("resourceVersion")
        if given and given != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {kind.plural} "{key[2]}": the object has '
                "been modified; please apply your changes to the latest version and try again",
            )
        new = copy.deepcopy(old)
        if sub == "approval":
            if kind.plural != "certificatesigningrequests":
                raise ApiError(404, "NotFound", "no approval subresource")
            conditions = (body.get("status") or {}).get("conditions") or []
            types = {c.get("type") for c in conditions if isinstance(c, dict)}
            if {"Approved", "Denied"} <= types:
                raise ApiError(
                    422, "Invalid", "Approved and Denied conditions are mutually exclusive"
                )
            self._may_approve(old, key[2], identity)
            was = {c.get("type") for c in (old.get("status") or {}).get("conditions") or []}
            if ("Approved" in was and "Denied" in types) or (
                "Denied" in was and "Approved" in types
            ):
                raise ApiError(422, "Invalid", "an approval decision cannot be reversed")
            new.setdefault("status", {})["conditions"] = conditions
            self.approval_puts[key[2]] += 1
            if "Approved" in types and "Approved" not in was:
                self.approved[key[2]] += 1
        elif sub == "status":
            new["status"] = body.get("status") or {}
        else:
            new = {**body, "status": old.get("status") or {}}
            new["metadata"] = {**old["metadata"], **(body.get("metadata") or {})}
        new["metadata"].pop("resourceVersion", None)
        return web.json_response(self.put(kind.plural, new, "MODIFIED"))

    def _may_approve(
        self, csr: dict[str, Any], name: str, identity: tuple[str, tuple[str, ...]]
    ) -> None:
        """CertificateApproval admission: `approve` on signers/<signerName> or <domain>/*."""
        signer = str((csr.get("spec") or {}).get("signerName") or "")
        user, groups = identity
        names = (signer, signer.split("/")[0] + "/*")
        asks = [
            Request(user, groups, "approve", "certificates.k8s.io", "signers", "", "", n)
            for n in names
        ]
        if any(self.allowed(req) for req in asks):
            return
        self.refused.append(asks[0])
        raise ApiError(
            403,
            "Forbidden",
            f'certificatesigningrequests.certificates.k8s.io "{name}" is forbidden: '
            f'user not permitted to approve requests with signerName "{signer}"',
            {"name": name, "group": "certificates.k8s.io", "kind": "certificatesigningrequests"},
        )

    def _log(self, key: tuple[str, str, str]) -> web.Response:
        obj = self.objects.get(key)
        if obj is None:
            raise ApiError(404, "NotFound", f'pods "{key[2]}" not found')
        phase = (obj.get("status") or {}).get("phase")
        if phase in (None, "Pending"):
            raise ApiError(
                400, "BadRequest", f'container "nvidia-smi" in pod "{key[2]}" is waiting to start'
            )
        return web.Response(text=self.logs.get((key[1], key[2]), ""), content_type="text/plain")

    async def _watch(
        self, request: web.Request, kind: Kind, namespace: str | None, selector: dict[str, str]
    ) -> web.StreamResponse:
        since = request.query.get("resourceVersion", "")
        try:
            timeout = float(request.query.get("timeoutSeconds", "1800"))
        except ValueError:
            raise ApiError(400, "BadRequest", "timeoutSeconds is not a number") from None
        w = _Watch(kind.plural, namespace, selector, asyncio.Queue())
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)

        async def send(event: str, obj: dict[str, Any]) -> None:
            await resp.write(json.dumps({"type": event, "object": obj}).encode() + b"\n")

        if since in ("", "0"):
            last = self.rv
            replay = [("ADDED", o) for o in self.items(kind.plural, namespace)]
        else:
            try:
                last = int(since)
            except ValueError:
                raise ApiError(400, "BadRequest", f"invalid resourceVersion {since!r}") from None
            if last < self.compacted:
                message = f"too old resource version: {last} ({self.compacted})"
                await send("ERROR", status_body(410, "Expired", message))
                return resp
            replay = [
                (event, obj)
                for rv, event, plural, obj in self.history
                if rv > last and plural == kind.plural
            ]
            last = self.rv
        # Registered in the same step as the snapshot: later events come by the queue.
        self.watches.append(w)
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            for event, obj in replay:
                if self._matches(w, obj):
                    await send(event, obj)
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(w.queue.get(), left)
                except TimeoutError:
                    break
                if item is None:  # the server goes away: cut the connection
                    if request.transport is not None:
                        request.transport.close()
                    break
                rv, event, obj = item
                if event == "ERROR":
                    await send(event, obj)
                    break
                if rv > last:
                    await send(event, obj)
                    last = rv
        except (ConnectionError, RuntimeError):
            pass  # the client went away
        finally:
            self.watches.remove(w)
        return resp


def _ready(ready: bool) -> dict[str, Any]:
    return {
        "type": "Ready",
        "status": "True" if ready else "False",
        "reason": "KubeletReady" if ready else "KubeletNotReady",
        "lastTransitionTime": _now(),
    }


# --- what a kubelet sends --------------------------------------------------------------------


def kubelet_csr(
    cn: str,
    *,
    orgs: Iterable[str] = ("system:nodes",),
    dns: Iterable[str] = (),
    ips: Iterable[str] = (),
    extra: Iterable[x509.NameAttribute[str]] = (),
) -> bytes:
    """A real PKCS#10 request (PEM) as the kubelet makes it: EC P-256, signed by its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    attrs.extend(extra)
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def tampered(pem: bytes) -> bytes:
    """The same request with its signature changed: it no longer verifies."""
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature's s value
    body = base64.encodebytes(bytes(der)).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        "-----BEGIN CERTIFICATE REQUEST-----\n"
        + "\n".join(lines)
        + "\n-----END CERTIFICATE REQUEST-----\n"
    ).encode()
