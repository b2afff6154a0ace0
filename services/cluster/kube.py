"""The thin kubernetes-asyncio layer: JSON in, JSON out, errors sorted into kinds.

kubernetes-asyncio loads the kubeconfig (server, CA, token or client certificate) and
makes the requests; everything here works on plain JSON objects, so CSRs, Nodes and
the OLM / NFD / GPU-operator custom resources go through one path. Errors come out as
Unreachable (connection refused or reset, timeouts, 5xx: retry after a back-off),
Gone (410: a watch's resourceVersion is too old: relist), Forbidden (403, with the
exact rule the request needed) or KubeError (anything else the server refused, with
its status and message).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import ConfigException, load_kube_config

from services.cluster.access import Attributes, request_attributes

REQUEST_TIMEOUT = 30.0  # seconds for one ordinary request


class KubeError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str, message: str = "") -> None:
        super().__init__(f"{status} {reason}" + (f": {message}" if message else ""))
        self.status = status
        self.reason = reason
        self.message = message


class Unreachable(Exception):
    """The API cannot be used right now (no connection, timeout, 5xx); back off and retry."""


class Gone(KubeError):
    """410: the resourceVersion is too old (compacted); list again."""


class Forbidden(KubeError):
    """403: RBAC (or an admission check) refused; `needs` is what the request asked for."""

    def __init__(self, reason: str, message: str, needs: Attributes | None) -> None:
        super().__init__(403, reason, message)
        self.needs = needs


class KubeconfigError(Exception):
    """The kubeconfig cannot be used; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class Resource:
    """Where a kind lives in the API: /api/v1 or /apis/<group>/<version>, plural, scope."""

    group: str
    version: str
    plural: str
    namespaced: bool

    def path(self, namespace: str | None = None, name: str | None = None, sub: str = "") -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced:
            if namespace is None:
                raise ValueError(f"{self.plural} is namespaced: a namespace is needed")
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{quote(name, safe='')}"
        if sub:
            base += f"/{sub}"
        return base


CSRS = Resource("certificates.k8s.io", "v1", "certificatesigningrequests", False)
NODES = Resource("", "v1", "nodes", False)
NAMESPACES = Resource("", "v1", "namespaces", False)
CONFIGMAPS = Resource("", "v1", "configmaps", True)
PODS = Resource("", "v1", "pods", True)
OPERATOR_GROUPS = Resource("operators.coreos.com", "v1", "operatorgroups", True)
SUBSCRIPTIONS = Resource("operators.coreos.com", "v1alpha1", "subscriptions", True)
CSVS = Resource("operators.coreos.com", "v1alpha1", "clusterserviceversions", True)
NFDS = Resource("nfd.openshift.io", "v1", "nodefeaturediscoveries", True)
CLUSTER_POLICIES = Resource("nvidia.com", "v1", "clusterpolicies", False)
ETCDS = Resource("operator.openshift.io", "v1", "etcds", False)


def _status_error(status: int, body: bytes, needs: Attributes | None = None) -> KubeError:
    reason, message = "", ""
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            reason = str(data.get("reason") or "")
            message = str(data.get("message") or "")
    except ValueError:
        message = body[:200].decode("utf-8", "replace").strip()
    if status == 403:
        return Forbidden(reason or "Forbidden", message, needs)
    cls = Gone if status == 410 else KubeError
    return cls(status, reason or "Error", message)


class Kube:
    """One API connection made from a kubeconfig."""

    def __init__(self, api: ApiClient, timeout: float = REQUEST_TIMEOUT) -> None:
        self.api = api
        self.timeout = timeout

    @classmethod
    async def from_kubeconfig(cls, path: Path, timeout: float = REQUEST_TIMEOUT) -> Kube:
        config = Configuration()
        try:
            # persist_config=False: never write refreshed credentials into the installer's file.
            await load_kube_config(
                config_file=str(path), client_configuration=config, persist_config=False
            )
        except (ConfigException, OSError, ValueError, KeyError, TypeError) as exc:
            raise KubeconfigError(f"{path}: {exc}") from None
        except Exception as exc:  # the YAML loader and the auth plugins raise their own
            raise KubeconfigError(f"{path}: {type(exc).__name__}: {exc}") from None
        config.connection_pool_maxsize = 16  # a few watches stay open beside the requests
        return cls(ApiClient(configuration=config), timeout)

    async def close(self) -> None:
        await self.api.close()

    # --- requests ----------------------------------------------------------------------

    async def _open(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        timeout: aiohttp.ClientTimeout | float | None = None,
        content_type: str = "application/json",
    ) -> aiohttp.ClientResponse:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            resp: aiohttp.ClientResponse = await self.api.call_api(
                path,
                method,
                query_params=list((query or {}).items()),
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=timeout if timeout is not None else self.timeout,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise Unreachable(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        except ApiException as exc:  # raised by the client before any byte was sent
            raise KubeError(exc.status or 0, str(exc.reason)) from None
        if resp.status >= 500 or resp.status == 429:
            text = await self._read(resp)
            resp.release()
            raise Unreachable(f"{method} {path}: {resp.status}: {text[:200]!r}")
        if resp.status >= 300:
            try:
                needs = request_attributes(method, path, query)
                raise _status_error(resp.status, await self._read(resp), needs)
            finally:
                resp.release()
        return resp

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        try:
            return await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise Unreachable(f"reading the answer: {type(exc).__name__}: {exc}") from None

    async def request(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        resp = await self._open(method, path, query, body, content_type=content_type)
        try:
            data = await self._read(resp)
        finally:
            resp.release()
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise KubeError(resp.status, "BadResponse", "the answer is not JSON") from None

    async def version(self) -> dict[str, Any]:
        answer = await self.request("GET", "/version")
        return answer if isinstance(answer, dict) else {}

    async def get(
        self, res: Resource, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        """The object, or None when it (or its kind) does not exist."""
        try:
            obj = await self.request("GET", res.path(namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return obj if isinstance(obj, dict) else None

    async def list(
        self,
        res: Resource,
        namespace: str | None = None,
        field_selector: str | None = None,
    ) -> dict[str, Any]:
        query = {"fieldSelector": field_selector} if field_selector else {}
        answer = await self.request("GET", res.path(namespace), query)
        if not isinstance(answer, dict):
            raise KubeError(200, "BadResponse", f"listing {res.plural} gave no object")
        return answer

    async def create(
        self, res: Resource, body: Mapping[str, Any], namespace: str | None = None
    ) -> bool:
        """Create; False when it exists already (409), so every step is idempotent."""
        try:
            await self.request("POST", res.path(namespace), body=dict(body))
        except KubeError as exc:
            if exc.status == 409:
                return False
            raise
        return True

    async def delete(self, res: Resource, name: str, namespace: str | None = None) -> bool:
        """Delete; False when it was gone already."""
        try:
            await self.request("DELETE", res.path(namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def replace(
        self,
        res: Resource,
        name: str,
        body: Mapping[str, Any],
        namespace: str | None = None,
        sub: str = "",
    ) -> dict[str, Any]:
        """PUT (with body's resourceVersion: a stale one is a 409 KubeError)."""
        answer = await self.request("PUT", res.path(namespace, name, sub), body=dict(body))
        return answer if isinstance(answer, dict) else {}

    async def text(self, path: str, query: Mapping[str, str] | None = None) -> str:
        """A plain-text answer (pod logs)."""
        resp = await self._open("GET", path, query)
        try:
            return (await self._read(resp)).decode("utf-8", "replace")
        finally:
            resp.release()

    async def pod_log(self, name: str, namespace: str, limit: int = 256 << 10) -> str:
        return await self.text(PODS.path(namespace, name, "log"), {"limitBytes": str(limit)})

    # --- watches ----------------------------------------------------------------------

    async def watch(
        self,
        res: Resource,
        resource_version: str,
        namespace: str | None = None,
        field_selector: str | None = None,
        timeout: float = 300.0,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(type, object) events after `resource_version` until the server ends the watch.

        BOOKMARK events are passed on (their object carries the newest resourceVersion).
        Raises Gone when the version is too old, Unreachable when the stream breaks.
        """
        query = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(max(1, int(timeout))),
        }
        if field_selector:
            query["fieldSelector"] = field_selector
        # The server ends the watch after timeoutSeconds; a silent connection longer than
        # that (plus slack) is a dead one.
        limits = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeout, sock_read=timeout + 30
        )
        resp = await self._open("GET", res.path(namespace), query, timeout=limits)
        try:
            while True:
                try:
                    line = await resp.content.readuntil(b"\n")
                except HttpProcessingError:  # longer than the client's read buffer
                    raise Unreachable(f"a {res.plural} watch event is too long") from None
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    raise Unreachable(f"{res.plural} watch: {type(exc).__name__}: {exc}") from None
                if not line:
                    return  # the server ended the watch
                if not line.endswith(b"\n"):
                    raise Unreachable(f"{res.plural} watch cut mid-event")
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    raise Unreachable(f"{res.plural} watch sent a line that is not JSON") from None
                kind = event.get("type") if isinstance(event, dict) else None
                obj = event.get("object") if isinstance(event, dict) else None
                if not isinstance(kind, str) or not isinstance(obj, dict):
                    raise Unreachable(f"{res.plural} watch sent a malformed event")
                if kind == "ERROR":
                    code = obj.get("code")
                    status = code if isinstance(code, int) else 500
                    needs = request_attributes("GET", res.path(namespace), query)
                    err = _status_error(status, json.dumps(obj).encode(), needs)
                    if status >= 500:
                        raise Unreachable(str(err))
                    raise err
                yield kind, obj
        finally:
            resp.release()
