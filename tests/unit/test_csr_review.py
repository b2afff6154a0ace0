"""CSR review with real PKCS#10 requests (made with cryptography), the breaker and the rate limit.

The plan is the article's cluster (config/dgxpod.yaml): bootstrap, master-0..2,
worker-0/1 in dgxpod.nvidia.com, 10.33.3.0/24. Legitimate kubelet client and serving
CSRs of inventory nodes are approved; each kind of forgery is left pending with its
own reason (or denied when kubernetes.deny_unmatched is set).
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterable
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from appliance.inventory import load_inventory
from appliance.plan import Plan, build_plan
from services.cluster.breaker import MARGIN, RateLimit, breaker_open, parse_time
from services.cluster.review import (
    BOOTSTRAPPER,
    CLIENT_SIGNER,
    SERVING_SIGNER,
    ClusterFacts,
    CsrInfo,
    review,
)
from tests.fakekube import kubelet_csr, tampered
from tests.helpers import CONFIG

D = "dgxpod.nvidia.com"
BOOTSTRAPPER_GROUPS = (
    "system:serviceaccounts",
    "system:serviceaccounts:openshift-machine-config-operator",
    "system:authenticated",
)
NODE_GROUPS = ("system:nodes", "system:authenticated")
CLIENT_USAGES = ("digital signature", "client auth")
SERVING_USAGES = ("digital signature", "server auth")
NO_NODES = ClusterFacts()


@pytest.fixture(scope="module")
def plan() -> Plan:
    return build_plan(load_inventory(CONFIG / "dgxpod.yaml"))


def csr(
    pem: bytes,
    *,
    signer: str = CLIENT_SIGNER,
    username: str = BOOTSTRAPPER,
    groups: Iterable[str] = BOOTSTRAPPER_GROUPS,
    usages: Iterable[str] = CLIENT_USAGES,
    expiration: int | None = None,
) -> CsrInfo:
    obj: dict[str, Any] = {
        "metadata": {"name": "csr-x", "uid": "u1", "resourceVersion": "7"},
        "spec": {
            "request": base64.b64encode(pem).decode(),
            "signerName": signer,
            "username": username,
            "groups": list(groups),
            "usages": list(usages),
        },
        "status": {},
    }
    if expiration is not None:
        obj["spec"]["expirationSeconds"] = expiration
    return CsrInfo.from_object(obj)


def serving(node: str = "master-0", **kw: Any) -> CsrInfo:
    dns = kw.pop("dns", (node, f"{node}.{D}"))
    ips = kw.pop("ips", ("10.33.3.50",))
    pem = kubelet_csr(f"system:node:{node}", dns=dns, ips=ips)
    kw.setdefault("signer", SERVING_SIGNER)
    kw.setdefault("username", f"system:node:{node}")
    kw.setdefault("groups", NODE_GROUPS)
    kw.setdefault("usages", SERVING_USAGES)
    return csr(pem, **kw)


# --- approved ---------------------------------------------------------------------------


def test_client_csr_from_the_bootstrapper_is_approved(plan: Plan) -> None:
    d = review(csr(kubelet_csr("system:node:master-0")), plan, NO_NODES)
    assert (d.verdict, d.kind, d.node) == ("approve", "client", "master-0")
    assert "master-0" in d.reason


def test_client_csr_with_fqdn_and_key_encipherment_is_approved(plan: Plan) -> None:
    usages = ("digital signature", "key encipherment", "client auth")
    d = review(csr(kubelet_csr(f"system:node:worker-1.{D}"), usages=usages), plan, NO_NODES)
    assert (d.verdict, d.node) == ("approve", "worker-1")


def test_client_renewal_by_the_node_itself_is_approved(plan: Plan) -> None:
    facts = ClusterFacts(frozenset({"master-0"}))
    info = csr(
        kubelet_csr("system:node:master-0"), username="system:node:master-0", groups=NODE_GROUPS
    )
    assert review(info, plan, facts).verdict == "approve"


def test_kubeadm_bootstrap_token_is_a_bootstrapper(plan: Plan) -> None:
    groups = (
        "system:bootstrappers",
        "system:bootstrappers:kubeadm:default-node-token",
        "system:authenticated",
    )
    info = csr(
        kubelet_csr("system:node:worker-0"), username="system:bootstrap:abcdef", groups=groups
    )
    assert review(info, plan, NO_NODES).verdict == "approve"
    info = csr(
        kubelet_csr("system:node:worker-0"),
        username="system:bootstrap:abcdef",
        groups=["system:authenticated"],
    )
    assert "system:bootstrappers" in review(info, plan, NO_NODES).reason


def test_serving_csr_is_approved(plan: Plan) -> None:
    d = review(serving(), plan, ClusterFacts(frozenset({"master-0"})))
    assert (d.verdict, d.kind, d.node) == ("approve", "serving", "master-0")


def test_serving_csr_with_only_an_ip_san_and_key_encipherment_is_approved(plan: Plan) -> None:
    usages = ("key encipherment", "digital signature", "server auth")
    d = review(serving("worker-0", dns=(), ips=("10.33.3.44",), usages=usages), plan, NO_NODES)
    assert d.verdict == "approve"


# --- left pending, each with its reason ---------------------------------------------------


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        # unknown node
        (lambda: csr(kubelet_csr("system:node:intruder")), "'intruder' is not an inventory node"),
        # the bootstrapper asks for a node that already exists
        (lambda: csr(kubelet_csr("system:node:worker-0")), "node worker-0 already exists"),
        # a node asks for another node's client certificate
        (
            lambda: csr(
                kubelet_csr("system:node:master-1"),
                username="system:node:master-0",
                groups=NODE_GROUPS,
            ),
            "does not match the subject CN",
        ),
        # somebody else entirely
        (
            lambda: csr(
                kubelet_csr("system:node:master-0"),
                username="kube:admin",
                groups=["system:authenticated"],
            ),
            "may not request kubelet client certificates",
        ),
        # the bootstrapper's name with other groups
        (
            lambda: csr(kubelet_csr("system:node:master-0"), groups=["system:authenticated"]),
            "not the bootstrapper's",
        ),
        (
            lambda: csr(
                kubelet_csr("system:node:master-0"), groups=[*BOOTSTRAPPER_GROUPS, "system:masters"]
            ),
            "not the bootstrapper's",
        ),
        # subject: O missing, a second O, another attribute, CN not a node
        (lambda: csr(kubelet_csr("system:node:master-0", orgs=())), "O is not system:nodes"),
        (
            lambda: csr(
                kubelet_csr("system:node:master-0", orgs=("system:nodes", "system:masters"))
            ),
            "O is not system:nodes",
        ),
        (
            lambda: csr(
                kubelet_csr(
                    "system:node:master-0", extra=[x509.NameAttribute(NameOID.COUNTRY_NAME, "US")]
                )
            ),
            "has other attributes",
        ),
        (lambda: csr(kubelet_csr("admin")), "CN is not system:node:<name>"),
        # SANs on a client certificate
        (lambda: csr(kubelet_csr("system:node:master-0", dns=("master-0",))), "must have no SANs"),
        # usages
        (
            lambda: csr(
                kubelet_csr("system:node:master-0"), usages=("digital signature", "server auth")
            ),
            "usages",
        ),
        (
            lambda: csr(kubelet_csr("system:node:master-0"), usages=(*CLIENT_USAGES, "cert sign")),
            "usages",
        ),
        # signature
        (lambda: csr(tampered(kubelet_csr("system:node:master-0"))), "signature does not verify"),
        (
            lambda: csr(
                b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
            ),
            "not a PEM",
        ),
        (lambda: csr(b""), "empty"),
    ],
    ids=[
        "unknown-node",
        "bootstrapper-for-existing-node",
        "cn-requestor-mismatch",
        "stranger",
        "bootstrapper-wrong-groups",
        "bootstrapper-extra-group",
        "o-missing",
        "two-orgs",
        "extra-subject-attribute",
        "cn-not-a-node",
        "client-with-san",
        "client-server-usages",
        "client-extra-usage",
        "bad-signature",
        "not-pem",
        "empty",
    ],
)
def test_forged_client_csrs_stay_pending(plan: Plan, make: Any, reason: str) -> None:
    facts = ClusterFacts(frozenset({f"worker-0.{D}"}))  # a Node named by its FQDN
    d = review(make(), plan, facts)
    assert d.verdict == "pending", d
    assert reason in d.reason, d.reason


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: serving(dns=("master-0", "evil.example.com")), "DNS SAN evil.example.com"),
        (lambda: serving(dns=("master-1",)), "DNS SAN master-1"),
        (lambda: serving(ips=("10.33.3.50", "10.33.3.99")), "IP SAN 10.33.3.99"),
        (lambda: serving(ips=("10.33.3.51",)), "IP SAN 10.33.3.51"),
        (lambda: serving(dns=(), ips=()), "at least one SAN"),
        (lambda: serving(username="system:node:master-1"), "does not match the subject CN"),
        (lambda: serving(username=BOOTSTRAPPER, groups=BOOTSTRAPPER_GROUPS), "does not match"),
        (lambda: serving(groups=("system:nodes",)), "has groups"),
        (lambda: serving(groups=(*NODE_GROUPS, "system:masters")), "has groups"),
        (lambda: serving(usages=("digital signature", "client auth")), "usages"),
        (lambda: serving(expiration=10 * 365 * 86400), "exceeds the cap"),
        (lambda: serving("intruder", ips=()), "not an inventory node"),
        (lambda: serving(signer="kubernetes.io/kube-apiserver-client"), "not a kubelet signer"),
        (lambda: serving(signer="example.com/anything"), "not a kubelet signer"),
    ],
    ids=[
        "extra-dns-san",
        "other-nodes-dns-san",
        "extra-ip-san",
        "other-nodes-ip",
        "no-san",
        "cn-requestor-mismatch",
        "bootstrapper-asks-serving",
        "missing-authenticated-group",
        "extra-group",
        "client-usages",
        "expiration-over-cap",
        "unknown-node",
        "wrong-signer",
        "foreign-signer",
    ],
)
def test_forged_serving_csrs_stay_pending(plan: Plan, make: Any, reason: str) -> None:
    d = review(make(), plan, ClusterFacts(frozenset({"master-0"})))
    assert d.verdict == "pending", d
    assert reason in d.reason, d.reason


def test_serving_expiration_within_the_cap_is_approved(plan: Plan) -> None:
    assert review(serving(expiration=86400), plan, NO_NODES).verdict == "approve"


def test_deny_unmatched_denies_kubelet_forgeries_but_not_foreign_signers(plan: Plan) -> None:
    strict = dataclasses.replace(
        plan, kubernetes=dataclasses.replace(plan.kubernetes, deny_unmatched=True)
    )
    d = review(csr(kubelet_csr("system:node:intruder")), strict, NO_NODES)
    assert (d.verdict, d.kind) == ("deny", "client")
    # Other signers belong to other approvers: never denied by us.
    d = review(serving(signer="example.com/anything"), strict, NO_NODES)
    assert (d.verdict, d.kind) == ("pending", "other")
    assert review(serving(), strict, NO_NODES).verdict == "approve"


def test_csr_info_reads_conditions_and_bad_base64() -> None:
    obj = {
        "metadata": {"name": "a", "uid": "u"},
        "spec": {"request": "!!not base64!!", "signerName": CLIENT_SIGNER},
        "status": {"conditions": [{"type": "Approved", "status": "True"}]},
    }
    info = CsrInfo.from_object(obj)
    assert info.state == "approved" and info.request == b""
    with pytest.raises(ValueError):
        CsrInfo.from_object({"metadata": {}})


# --- breaker and rate limit ---------------------------------------------------------------


def test_breaker_opens_above_nodes_plus_margin() -> None:
    nodes, now = 6, 10_000.0
    assert not breaker_open([now] * (nodes + MARGIN), nodes, now)
    assert breaker_open([now] * (nodes + MARGIN + 1), nodes, now)
    # Old pending CSRs do not count: the flood is over.
    assert not breaker_open([now - 7200] * 500, nodes, now)


def test_rate_limit_is_a_token_bucket() -> None:
    limit = RateLimit(per_minute=60, burst=3)
    t = 100.0
    assert [limit.allow(t) for _ in range(4)] == [True, True, True, False]
    assert limit.wait(t) == pytest.approx(1.0)
    assert not limit.allow(t + 0.5)
    assert limit.allow(t + 1.0)
    # Refill never exceeds the burst.
    assert [limit.allow(t + 1000) for _ in range(4)] == [True, True, True, False]
    limit.reconfigure(per_minute=6, burst=1)
    assert limit.wait(t + 1000) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        RateLimit(per_minute=0, burst=1)


def test_parse_time() -> None:
    assert parse_time("1970-01-01T00:01:00Z") == 60.0
    assert parse_time("garbage") is None
    assert parse_time("") is None
