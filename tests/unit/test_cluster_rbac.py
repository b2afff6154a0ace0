"""The cluster loop's least-privilege identity (`render --as rbac`), what a refused request
needed, and each worker's own back-off (services/cluster/rbac.py, access.py, workers.py)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from kubernetes_asyncio.client import models

from appliance.inventory import load_inventory, parse_inventory
from appliance.plan import Plan, build_plan
from appliance.render import render
from services.cluster import rbac
from services.cluster.access import Attributes, request_attributes
from services.cluster.kube import Forbidden, KubeError, Unreachable
from services.cluster.workers import BACKING_OFF, FORBIDDEN, OK, WorkerState, classify
from tests.fakekube import Request, rule_allows
from tests.helpers import CONFIG


@pytest.fixture(scope="module")
def plan() -> Plan:
    return build_plan(load_inventory(CONFIG / "dgxpod.yaml"))


def strict(model: str, data: Any, where: str = "") -> None:
    """Every key is a field of the API's own type (kubernetes-asyncio's generated models),
    so a misspelt key (which `kubectl apply` would refuse or drop) fails here."""
    if model.startswith("list["):
        assert isinstance(data, list), where
        for i, item in enumerate(data):
            strict(model[5:-1], item, f"{where}[{i}]")
        return
    if model.startswith("dict("):
        assert isinstance(data, dict) and all(isinstance(v, str) for v in data.values()), where
        return
    if model in ("str", "bool", "int"):
        assert isinstance(data, {"str": str, "bool": bool, "int": int}[model]), where
        return
    cls = getattr(models, model)
    assert isinstance(data, dict), where
    fields = {json: attr for attr, json in cls.attribute_map.items()}
    for key, value in data.items():
        assert key in fields, f"{where}.{key} is not a field of {model}"
        strict(cls.openapi_types[fields[key]], value, f"{where}.{key}")
    cls(**{fields[k]: v for k, v in data.items()})  # a required field missing raises


def test_render_is_yaml_that_kubectl_apply_takes(plan: Plan) -> None:
    text = render(plan, "rbac")
    assert text.startswith("#") and text.endswith("\n")
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    assert docs == rbac.manifests(plan)
    kinds = [d["kind"] for d in docs]
    # Namespaces before what lives in them, the ServiceAccount before its token Secret,
    # each Role before its RoleBinding.
    assert kinds[:5] == ["Namespace", "Namespace", "Namespace", "ServiceAccount", "Secret"]
    assert kinds[5:7] == ["ClusterRole", "ClusterRoleBinding"]
    assert kinds[7:] == ["Role", "RoleBinding"] * 3
    names = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs}
    assert len(names) == len(docs)  # no object twice
    for doc in docs:
        strict(f"V1{doc['kind']}", doc, doc["kind"])
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    for binding in (d for d in docs if d["kind"].endswith("Binding")):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": rbac.NAME, "namespace": rbac.NAMESPACE}
        ]
        assert binding["roleRef"]["kind"] == binding["kind"].removesuffix("Binding")
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert secret["type"] == "kubernetes.io/service-account-token"
    assert secret["metadata"]["annotations"] == {"kubernetes.io/service-account.name": rbac.NAME}


def test_rules_are_least_privilege(plan: Plan) -> None:
    everything = rbac.cluster_rules(plan) + [
        r for rules in rbac.namespaced_rules(plan).values() for r in rules
    ]
    for rule in everything:
        assert "*" not in rule["verbs"] + rule["apiGroups"] + rule["resources"], rule
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
    cluster = rbac.cluster_rules(plan)
    writes = [r for r in cluster if set(r["verbs"]) - {"get", "list", "watch"}]
    # Cluster-wide writes: the approval subresource, approving for the two kubelet
    # signers only, and creating the one ClusterPolicy. No namespaces, no secrets.
    assert [(r["resources"], r["verbs"]) for r in writes] == [
        (["certificatesigningrequests/approval"], ["update"]),
        (["signers"], ["approve"]),
        (["clusterpolicies"], ["create"]),
    ]
    assert writes[1]["resourceNames"] == [
        "kubernetes.io/kube-apiserver-client-kubelet",
        "kubernetes.io/kubelet-serving",
    ]
    assert not any("secrets" in r["resources"] for r in everything)
    (cm,) = rbac.namespaced_rules(plan)["kube-system"]
    assert cm["resourceNames"] == ["bootstrap"]  # not every ConfigMap of kube-system


def test_without_the_gpu_operator_no_gpu_rules(dgxpod_raw: dict[str, Any]) -> None:
    dgxpod_raw.setdefault("kubernetes", {})["gpu_operator"] = False
    plan = build_plan(parse_inventory(dgxpod_raw, "test.yaml", CONFIG))
    docs = rbac.manifests(plan)
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"] == ["appliance"]
    assert [d["metadata"]["namespace"] for d in docs if d["kind"] == "Role"] == ["kube-system"]
    text = render(plan, "rbac")
    for word in ("nvidia-gpu-operator", "clusterpolicies", "operators.coreos.com", "pods"):
        assert word not in text


# --- what a request needs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        (
            "GET",
            "/apis/operator.openshift.io/v1/etcds/cluster",
            {},
            Attributes("get", "operator.openshift.io", "etcds", name="cluster"),
        ),
        (
            "GET",
            "/apis/certificates.k8s.io/v1/certificatesigningrequests",
            {},
            Attributes("list", "certificates.k8s.io", "certificatesigningrequests"),
        ),
        (
            "GET",
            "/api/v1/namespaces/kube-system/configmaps",
            {"watch": "true", "fieldSelector": "metadata.name=bootstrap"},
            Attributes("watch", "", "configmaps", namespace="kube-system", name="bootstrap"),
        ),
        (
            "PUT",
            "/apis/certificates.k8s.io/v1/certificatesigningrequests/csr-x/approval",
            {},
            Attributes(
                "update",
                "certificates.k8s.io",
                "certificatesigningrequests",
                "approval",
                name="csr-x",
            ),
        ),
        (
            "POST",
            "/apis/operators.coreos.com/v1/namespaces/openshift-nfd/operatorgroups",
            {},
            Attributes(
                "create", "operators.coreos.com", "operatorgroups", namespace="openshift-nfd"
            ),
        ),
        (
            "GET",
            "/api/v1/namespaces/nvidia-gpu-operator/pods/nvidia-smi-w/log",
            {"limitBytes": "1"},
            Attributes("get", "", "pods", "log", "nvidia-gpu-operator", "nvidia-smi-w"),
        ),
        (
            "GET",
            "/api/v1/namespaces/openshift-nfd",
            {},
            Attributes("get", "", "namespaces", name="openshift-nfd"),
        ),
        (
            "DELETE",
            "/api/v1/namespaces/x/pods",
            {},
            Attributes("deletecollection", "", "pods", namespace="x"),
        ),
        ("GET", "/version", {}, None),
    ],
)
def test_request_attributes(
    method: str, path: str, query: dict[str, str], expected: Attributes | None
) -> None:
    assert request_attributes(method, path, query) == expected


def test_a_missing_rule_is_said_as_the_rule_to_add() -> None:
    etcd = Attributes("get", "operator.openshift.io", "etcds", name="cluster")
    assert etcd.describe() == 'get etcds.operator.openshift.io "cluster" at the cluster scope'
    assert etcd.rule_text() == (
        'ClusterRole rule {apiGroups: ["operator.openshift.io"], resources: ["etcds"], '
        'verbs: ["get"], resourceNames: ["cluster"]}'
    )
    create = Attributes("create", "operators.coreos.com", "operatorgroups", namespace="nfd")
    assert create.rule() == {
        "apiGroups": ["operators.coreos.com"],
        "resources": ["operatorgroups"],
        "verbs": ["create"],
    }
    assert create.rule_text().startswith('Role in "nfd" rule')
    approval = Attributes(
        "update", "certificates.k8s.io", "certificatesigningrequests", "approval", name="csr-abc12"
    )
    assert "resourceNames" not in approval.rule()  # kubelets make the names up
    assert approval.rule()["resources"] == ["certificatesigningrequests/approval"]


def test_every_request_of_the_loop_is_allowed_by_the_rendered_rules(plan: Plan) -> None:
    """The requests the workers make (paths as kube.py builds them), checked with the
    fake API server's RBAC matcher against the rendered rules."""
    from services.cluster import gpu, kube

    requests = [
        ("GET", kube.CSRS.path(), {}),
        ("GET", kube.CSRS.path(), {"watch": "true"}),
        ("PUT", kube.CSRS.path(None, "csr-1", "approval"), {}),
        ("GET", kube.NODES.path(), {"watch": "true"}),
        ("GET", kube.NODES.path(None, "worker-0"), {}),
        ("GET", kube.CONFIGMAPS.path("kube-system"), {"fieldSelector": "metadata.name=bootstrap"}),
        ("GET", kube.ETCDS.path(None, "cluster"), {}),
        ("GET", kube.NAMESPACES.path(None, gpu.GPU_NAMESPACE), {}),
        ("POST", kube.SUBSCRIPTIONS.path(gpu.NFD_NAMESPACE), {}),
        ("GET", kube.SUBSCRIPTIONS.path(gpu.GPU_NAMESPACE, gpu.GPU_PACKAGE), {}),
        ("POST", kube.CLUSTER_POLICIES.path(), {}),
        ("POST", kube.PODS.path(gpu.GPU_NAMESPACE), {}),
        ("GET", kube.PODS.path(gpu.GPU_NAMESPACE, "nvidia-smi-w", "log"), {}),
        ("DELETE", kube.PODS.path(gpu.GPU_NAMESPACE, "nvidia-smi-w"), {}),
    ]
    namespaced = rbac.namespaced_rules(plan)
    for method, path, query in requests:
        a = request_attributes(method, path, query)
        assert a is not None
        req = Request("sa", (), a.verb, a.group, a.resource, a.subresource, a.namespace, a.name)
        rules = namespaced.get(a.namespace, []) + rbac.cluster_rules(plan)
        assert any(rule_allows(r, req) for r in rules), (method, path)
    # ... and not more: another ConfigMap, a Secret, a namespace of someone else.
    for a in (
        Attributes("get", "", "configmaps", namespace="kube-system", name="other"),
        Attributes("list", "", "configmaps", namespace="kube-system"),
        Attributes("get", "", "secrets", namespace="kube-system", name="x"),
        Attributes("create", "", "namespaces"),
        Attributes("create", "", "pods", namespace="default"),
    ):
        req = Request("sa", (), a.verb, a.group, a.resource, a.subresource, a.namespace, a.name)
        rules = namespaced.get(a.namespace, []) + rbac.cluster_rules(plan)
        assert not any(rule_allows(r, req) for r in rules), a


def test_the_fakes_rbac_matcher() -> None:
    req = Request(
        "u", (), "update", "certificates.k8s.io", "certificatesigningrequests", "approval"
    )
    assert rule_allows({"apiGroups": ["*"], "resources": ["*/approval"], "verbs": ["update"]}, req)
    assert not rule_allows(
        {
            "apiGroups": ["certificates.k8s.io"],
            "resources": ["certificatesigningrequests"],
            "verbs": ["*"],
        },
        req,
    )  # the resource alone does not grant its subresources
    named = {
        "apiGroups": [""],
        "resources": ["configmaps"],
        "verbs": ["list"],
        "resourceNames": ["bootstrap"],
    }
    assert rule_allows(named, Request("u", (), "list", "", "configmaps", name="bootstrap"))
    assert not rule_allows(named, Request("u", (), "list", "", "configmaps"))


# --- each worker's own back-off ----------------------------------------------------------


def forbidden_etcd() -> Forbidden:
    needs = Attributes("get", "operator.openshift.io", "etcds", name="cluster")
    return Forbidden("Forbidden", 'etcds.operator.openshift.io "cluster" is forbidden: ...', needs)


def test_classify() -> None:
    f = classify(forbidden_etcd())
    assert f.state == FORBIDDEN and f.missing is not None and not f.unreachable
    assert f.detail.startswith('needs get etcds.operator.openshift.io "cluster"')
    assert classify(Unreachable("refused")).unreachable
    assert classify(KubeError(422, "Invalid", "x")).state == BACKING_OFF
    bug = classify(ValueError("boom"))
    assert bug.bug and "ValueError: boom" in bug.detail


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    w = WorkerState("bootstrap", first=1.0, cap=8.0, stable=10.0, now=0.0)
    now, delays = 0.0, []
    for _ in range(6):
        w.start(now)
        delays.append(w.fail(classify(forbidden_etcd()), now + 0.1, jitter=0.999))
        now += 20  # not reached: the attempt fails at once each time
    assert [round(d) for d in delays] == [1, 2, 4, 8, 8, 8]
    w2 = WorkerState("x", first=1.0, cap=8.0, stable=10.0, now=0.0)
    w2.start(0)
    assert w2.fail(classify(forbidden_etcd()), 0.1, jitter=0.0) == 0.5  # half at least


def test_view_forbidden_then_ok_once_it_runs_well() -> None:
    w = WorkerState("bootstrap", first=1.0, cap=60.0, stable=10.0, now=0.0)
    assert w.view(0.0)["state"] == OK
    w.start(0.0)
    w.fail(classify(forbidden_etcd()), 0.2, jitter=0.0)
    view = w.view(0.3)
    assert view["state"] == FORBIDDEN and view["failures"] == 1
    assert view["missing"]["rule"]["resources"] == ["etcds"] and view["retry_in"] == 0.4
    w.start(0.7)  # the retry runs: still shown forbidden until it has run `stable`
    assert w.view(5.0)["state"] == FORBIDDEN
    assert w.view(10.8) == {"state": OK, "detail": "", "failures": 0, "since": 0.7}
    # A failure after a good run starts the back-off from the first step again.
    assert w.fail(classify(Unreachable("reset")), 11.0, jitter=0.999) < 1.0


def test_off_worker() -> None:
    w = WorkerState("csr", 1.0, 60.0, 10.0, 0.0)
    w.off = True
    assert w.view(1.0)["state"] == "off"


def test_the_cli_renders_it(plan: Plan, capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.cli import main

    assert main(["render", "--config", str(CONFIG / "dgxpod.yaml"), "--as", "rbac"]) == 0
    assert capsys.readouterr().out == render(plan, "rbac")
