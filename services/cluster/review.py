"""CSR review (sans-IO): may this CertificateSigningRequest get a kubelet certificate?

The article's cron job approved every pending CSR, so anyone able to create one got a
node certificate. Here a CSR is approved only when everything in it matches an
inventory node: signer, requestor (user and groups), the PKCS#10 subject, SANs and key
usages, and the request's own signature (parsed with cryptography). Everything else
is left pending (or denied, when the inventory says so) with the reason recorded.

`review` is a pure function of the CSR's values, the plan and what the cluster looks
like (which Node objects exist); it never talks to the API.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography import x509
from cryptography.x509.oid import NameOID

from appliance.plan import CsrNode, Plan

CLIENT_SIGNER = "kubernetes.io/kube-apiserver-client-kubelet"
SERVING_SIGNER = "kubernetes.io/kubelet-serving"
NODE_PREFIX = "system:node:"
NODES_GROUP = "system:nodes"
AUTHENTICATED = "system:authenticated"
BOOTSTRAPPER = "system:serviceaccount:openshift-machine-config-operator:node-bootstrapper"
BOOTSTRAPPER_GROUPS = frozenset(
    {
        "system:serviceaccounts",
        "system:serviceaccounts:openshift-machine-config-operator",
        AUTHENTICATED,
    }
)
BOOTSTRAP_TOKEN_PREFIX = "system:bootstrap:"  # kubeadm bootstrap tokens
BOOTSTRAPPERS_GROUP = "system:bootstrappers"
NODE_GROUPS = frozenset({NODES_GROUP, AUTHENTICATED})
CLIENT_USAGES = (
    frozenset({"digital signature", "client auth"}),
    frozenset({"digital signature", "key encipherment", "client auth"}),
)
SERVING_USAGES = (
    frozenset({"digital signature", "server auth"}),
    frozenset({"digital signature", "key encipherment", "server auth"}),
)

Verdict = Literal["approve", "pending", "deny"]
Kind = Literal["client", "serving", "other"]
State = Literal["pending", "approved", "denied", "failed"]


@dataclass(frozen=True, slots=True)
class CsrInfo:
    """The values of a CertificateSigningRequest that review looks at."""

    name: str
    uid: str
    signer: str
    username: str
    groups: tuple[str, ...]
    usages: tuple[str, ...]
    request: bytes  # the PEM (spec.request, base64-decoded)
    expiration_seconds: int | None = None
    resource_version: str = ""
    created: str = ""  # metadata.creationTimestamp (RFC 3339)
    state: State = "pending"

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> CsrInfo:
        """Plain values from the API's JSON; ValueError when a required field is unusable."""
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("CSR without metadata.name")
        try:
            request = base64.b64decode(spec.get("request") or "", validate=True)
        except (binascii.Error, ValueError, TypeError):
            request = b""  # review() refuses it with its reason
        state: State = "pending"
        for cond in status.get("conditions") or []:
            kind = cond.get("type") if isinstance(cond, Mapping) else None
            if kind == "Approved":
                state = "approved"
            elif kind == "Denied":
                state = "denied"
            elif kind == "Failed":
                state = "failed"
        expiration = spec.get("expirationSeconds")
        return cls(
            name=name,
            uid=str(meta.get("uid") or ""),
            signer=str(spec.get("signerName") or ""),
            username=str(spec.get("username") or ""),
            groups=tuple(str(g) for g in spec.get("groups") or ()),
            usages=tuple(str(u) for u in spec.get("usages") or ()),
            request=request,
            expiration_seconds=expiration if isinstance(expiration, int) else None,
            resource_version=str(meta.get("resourceVersion") or ""),
            created=str(meta.get("creationTimestamp") or ""),
            state=state,
        )


@dataclass(frozen=True, slots=True)
class ClusterFacts:
    """What the cluster looks like to the reviewer: the names of the Node objects."""

    nodes: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str
    kind: Kind
    node: str = ""  # the inventory node it is for, when one matched

    @property
    def approved(self) -> bool:
        return self.verdict == "approve"


class _Refused(Exception):
    """One reason a CSR is not approved."""


def _kind(signer: str) -> Kind:
    if signer == CLIENT_SIGNER:
        return "client"
    if signer == SERVING_SIGNER:
        return "serving"
    return "other"


def find_node(plan: Plan, name: str) -> CsrNode | None:
    """The inventory node called `name` (its short name or FQDN, any case)."""
    want = name.lower().rstrip(".")
    for node in plan.csr_allow:
        if want in (node.name.lower(), node.fqdn.lower()):
            return node
    return None


def is_bootstrapper(username: str) -> bool:
    """A requestor that may ask only for nodes that do not exist yet."""
    return username == BOOTSTRAPPER or username.startswith(BOOTSTRAP_TOKEN_PREFIX)


def node_exists(facts: ClusterFacts, node: CsrNode) -> bool:
    names = {n.lower() for n in facts.nodes}
    return node.name.lower() in names or node.fqdn.lower() in names


def review(csr: CsrInfo, plan: Plan, facts: ClusterFacts) -> Decision:
    """Approve, leave pending or deny one CSR; the reason says why."""
    kind = _kind(csr.signer)
    if kind == "other":
        # Someone else's signer (or a forgery): never ours to approve. Left alone even
        # with deny_unmatched, since other approvers may own it.
        return Decision("pending", f"signer {csr.signer or '(none)'} is not a kubelet signer", kind)
    node: CsrNode | None = None
    try:
        parsed = _parse(csr.request)
        cn = _subject(parsed)
        node = find_node(plan, cn)
        if node is None:
            raise _Refused(f"{cn!r} is not an inventory node")
        if kind == "client":
            _check_client(csr, parsed, cn, node, facts)
        else:
            _check_serving(csr, parsed, cn, node, plan.kubernetes.serving_max_expiration)
    except _Refused as why:
        verdict: Verdict = "deny" if plan.kubernetes.deny_unmatched else "pending"
        return Decision(verdict, str(why), kind, node.name if node else "")
    what = "client" if kind == "client" else "serving"
    return Decision(
        "approve", f"{what} certificate for inventory node {node.name}", kind, node.name
    )


def _parse(pem: bytes) -> x509.CertificateSigningRequest:
    if not pem.strip():
        raise _Refused("spec.request is empty or not base64")
    try:
        parsed = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise _Refused(f"spec.request is not a PEM certificate request: {exc}") from None
    try:
        valid = parsed.is_signature_valid
    except Exception as exc:  # an unsupported key or algorithm: not verifiable, not approved
        raise _Refused(f"request signature cannot be checked: {exc}") from None
    if not valid:
        raise _Refused("request signature does not verify")
    return parsed


def _subject(parsed: x509.CertificateSigningRequest) -> str:
    """The node name from a subject of exactly CN=system:node:<name>, O=system:nodes."""
    attrs = list(parsed.subject)
    cns = [a.value for a in attrs if a.oid == NameOID.COMMON_NAME]
    orgs = [a.value for a in attrs if a.oid == NameOID.ORGANIZATION_NAME]
    if len(cns) != 1 or not isinstance(cns[0], str) or not cns[0].startswith(NODE_PREFIX):
        raise _Refused(f"subject {parsed.subject.rfc4514_string()!r}: CN is not system:node:<name>")
    if orgs != [NODES_GROUP]:
        raise _Refused(f"subject {parsed.subject.rfc4514_string()!r}: O is not {NODES_GROUP}")
    if len(attrs) != 2:
        raise _Refused(f"subject {parsed.subject.rfc4514_string()!r} has other attributes")
    name = cns[0].removeprefix(NODE_PREFIX)
    if not name:
        raise _Refused("subject CN names no node")
    return name


def _sans(parsed: x509.CertificateSigningRequest) -> x509.SubjectAlternativeName | None:
    try:
        ext = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:  # a malformed extension
        raise _Refused(f"request extensions cannot be parsed: {exc}") from None
    return ext.value


def _usages(got: Iterable[str], allowed: tuple[frozenset[str], ...]) -> None:
    usages = frozenset(got)
    if usages not in allowed:
        want = " or ".join("{" + ", ".join(sorted(a)) + "}" for a in allowed)
        raise _Refused(f"usages {{{', '.join(sorted(usages))}}} are not {want}")


def _check_client(
    csr: CsrInfo,
    parsed: x509.CertificateSigningRequest,
    cn: str,
    node: CsrNode,
    facts: ClusterFacts,
) -> None:
    groups = frozenset(csr.groups)
    user = csr.username
    if is_bootstrapper(user):
        if user == BOOTSTRAPPER and groups != BOOTSTRAPPER_GROUPS:
            raise _Refused(f"requestor {user} has groups {sorted(groups)}, not the bootstrapper's")
        if user != BOOTSTRAPPER and not {BOOTSTRAPPERS_GROUP, AUTHENTICATED} <= groups:
            raise _Refused(f"bootstrap token {user} is not in {BOOTSTRAPPERS_GROUP}")
        if node_exists(facts, node):
            raise _Refused(
                f"node {node.name} already exists: only the node itself may renew its "
                "client certificate"
            )
    elif user.startswith(NODE_PREFIX):
        if user.removeprefix(NODE_PREFIX).lower() != cn.lower():
            raise _Refused(f"requestor {user} does not match the subject CN system:node:{cn}")
        if groups != NODE_GROUPS:
            raise _Refused(
                f"requestor {user} has groups {sorted(groups)}, not {sorted(NODE_GROUPS)}"
            )
    else:
        raise _Refused(f"requestor {user or '(none)'} may not request kubelet client certificates")
    sans = _sans(parsed)
    if sans is not None and len(sans) > 0:
        raise _Refused("a kubelet client certificate request must have no SANs")
    _usages(csr.usages, CLIENT_USAGES)


def _check_serving(
    csr: CsrInfo, parsed: x509.CertificateSigningRequest, cn: str, node: CsrNode, max_exp: int
) -> None:
    user = csr.username
    if user.removeprefix(NODE_PREFIX).lower() != cn.lower() or not user.startswith(NODE_PREFIX):
        raise _Refused(
            f"requestor {user or '(none)'} does not match the subject CN {NODE_PREFIX}{cn}"
        )
    groups = frozenset(csr.groups)
    if groups != NODE_GROUPS:
        raise _Refused(f"requestor {user} has groups {sorted(groups)}, not {sorted(NODE_GROUPS)}")
    sans = _sans(parsed)
    if sans is None or len(sans) == 0:
        raise _Refused("a kubelet serving certificate request needs at least one SAN")
    allowed_dns = {node.name.lower(), node.fqdn.lower()}
    for entry in sans:
        if isinstance(entry, x509.DNSName):
            if entry.value.lower().rstrip(".") not in allowed_dns:
                raise _Refused(f"DNS SAN {entry.value} is not {node.name} or {node.fqdn}")
        elif isinstance(entry, x509.IPAddress):
            ip = entry.value
            if ip != node.ip:
                raise _Refused(f"IP SAN {ip} is not {node.name}'s address {node.ip}")
        else:
            raise _Refused(f"SAN {entry} is neither a DNS name nor an IP address")
    _usages(csr.usages, SERVING_USAGES)
    if csr.expiration_seconds is not None and csr.expiration_seconds > max_exp:
        raise _Refused(
            f"requested expiration {csr.expiration_seconds} s exceeds the cap of {max_exp} s"
        )
