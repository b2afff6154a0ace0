"""The least-privilege identity of the cluster loop, and what a refused request needed.

One source for both directions:
- `manifests(plan)` / `render(plan)`: the ServiceAccount, ClusterRole, ClusterRoleBinding
  and namespaced Roles the cluster loop needs (`appliance render --as rbac`), the way
  OpenShift's cluster-machine-approver has its own role instead of cluster-admin. Only
  what the loop does: read CSRs and approve them for the two kubelet signers, read Nodes,
  read the `bootstrap` ConfigMap and the etcd operator's `cluster`; with the GPU bring-up,
  create the OLM objects, NFD instance, ClusterPolicy and nvidia-smi pods in their
  namespaces (which the rendered output creates, so no cluster-wide namespace creation).
- services.cluster.access describes a refused request as the rule that would allow it.

Pure: no I/O; the YAML is built from plain data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from appliance.plan import Plan
from services.cluster import gpu
from services.cluster.access import Rule, make_rule
from services.cluster.bootstrap import CONFIGMAP_NAME, CONFIGMAP_NAMESPACE
from services.cluster.review import CLIENT_SIGNER, SERVING_SIGNER

NAMESPACE = "appliance"  # where the ServiceAccount lives
NAME = "appliance-cluster-loop"  # the ServiceAccount, its roles and bindings
TOKEN_SECRET = "appliance-cluster-loop-token"
RBAC = "rbac.authorization.k8s.io"
CERTS = "certificates.k8s.io"

_rule = make_rule


def cluster_rules(plan: Plan) -> list[Rule]:
    """The ClusterRole's rules (cluster-scoped objects; CSRs and Nodes everywhere)."""
    rules = [
        # The CSR approver: list+watch, then the approval subresource, and the signers
        # it may approve for (the CertificateApproval admission check).
        _rule(CERTS, ["certificatesigningrequests"], ["get", "list", "watch"]),
        _rule(CERTS, ["certificatesigningrequests/approval"], ["update"]),
        _rule(CERTS, ["signers"], ["approve"], [CLIENT_SIGNER, SERVING_SIGNER]),
        # Which Nodes exist (bootstrapper CSRs), Ready, NFD labels.
        _rule("", ["nodes"], ["get", "list", "watch"]),
        # Bootstrap retirement: the etcd operator's EtcdBootstrapMemberRemoved.
        _rule("operator.openshift.io", ["etcds"], ["get"], ["cluster"]),
    ]
    if gpu_wanted(plan):
        rules += [
            _rule("", ["namespaces"], ["get"], [gpu.NFD_NAMESPACE, gpu.GPU_NAMESPACE]),
            # create cannot be limited by name (there is none before the object exists).
            _rule("nvidia.com", ["clusterpolicies"], ["create"]),
            _rule("nvidia.com", ["clusterpolicies"], ["get"], [gpu.CLUSTER_POLICY]),
        ]
    return rules


def namespaced_rules(plan: Plan) -> dict[str, list[Rule]]:
    """Namespace -> the rules of the Role there."""
    out = {
        CONFIGMAP_NAMESPACE: [
            # list/watch with fieldSelector metadata.name=bootstrap count as that name.
            _rule("", ["configmaps"], ["get", "list", "watch"], [CONFIGMAP_NAME]),
        ]
    }
    if gpu_wanted(plan):
        olm = "operators.coreos.com"
        for ns, package in (
            (gpu.NFD_NAMESPACE, gpu.NFD_PACKAGE),
            (gpu.GPU_NAMESPACE, gpu.GPU_PACKAGE),
        ):
            out[ns] = [
                _rule(olm, ["operatorgroups", "subscriptions"], ["create"]),
                _rule(olm, ["subscriptions"], ["get"], [package]),
                _rule(olm, ["clusterserviceversions"], ["get"]),
            ]
        out[gpu.NFD_NAMESPACE].append(
            _rule("nfd.openshift.io", ["nodefeaturediscoveries"], ["create"])
        )
        out[gpu.GPU_NAMESPACE] += [
            _rule("", ["pods"], ["create", "get", "delete"]),
            _rule("", ["pods/log"], ["get"]),
        ]
    return out


def gpu_wanted(plan: Plan) -> bool:
    return plan.kubernetes.gpu_operator and any(n.gpu and n.role != "bootstrap" for n in plan.nodes)


def _meta(name: str, namespace: str | None = None, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta.update(extra)
    return meta


def _subject() -> dict[str, str]:
    return {"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}


def manifests(
    plan: Plan,
    cluster: list[Rule] | None = None,
    namespaced: Mapping[str, list[Rule]] | None = None,
) -> list[dict[str, Any]]:
    """The objects, in the order `kubectl apply -f -` must create them.

    `cluster` / `namespaced` replace the computed rules (tests remove one to see the
    loop report exactly that rule).
    """
    labels = {"app.kubernetes.io/name": "appliance", "app.kubernetes.io/component": "cluster-loop"}
    cluster = cluster_rules(plan) if cluster is None else cluster
    namespaced = namespaced_rules(plan) if namespaced is None else namespaced
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(NAMESPACE, labels=labels)}
    ]
    if gpu_wanted(plan):
        # The loop only reads these (no cluster-wide namespace creation): created here.
        docs += [gpu.namespace(gpu.NFD_NAMESPACE), gpu.namespace(gpu.GPU_NAMESPACE)]
    docs += [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(NAME, NAMESPACE, labels=labels),
        },
        {
            # A long-lived token for a daemon outside the cluster (bound tokens from
            # `oc create token` expire); the token controller fills it in.
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/service-account-token",
            "metadata": _meta(
                TOKEN_SECRET,
                NAMESPACE,
                labels=labels,
                annotations={"kubernetes.io/service-account.name": NAME},
            ),
        },
        {
            "apiVersion": f"{RBAC}/v1",
            "kind": "ClusterRole",
            "metadata": _meta(NAME, labels=labels),
            "rules": cluster,
        },
        {
            "apiVersion": f"{RBAC}/v1",
            "kind": "ClusterRoleBinding",
            "metadata": _meta(NAME, labels=labels),
            "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": NAME},
            "subjects": [_subject()],
        },
    ]
    for ns in sorted(namespaced):
        docs.append(
            {
                "apiVersion": f"{RBAC}/v1",
                "kind": "Role",
                "metadata": _meta(NAME, ns, labels=labels),
                "rules": namespaced[ns],
            }
        )
        docs.append(
            {
                "apiVersion": f"{RBAC}/v1",
                "kind": "RoleBinding",
                "metadata": _meta(NAME, ns, labels=labels),
                "roleRef": {"apiGroup": RBAC, "kind": "Role", "name": NAME},
                "subjects": [_subject()],
            }
        )
    return docs


def render(plan: Plan) -> str:
    """YAML documents for `kubectl apply -f -`."""
    head = (
        f"# The cluster loop's least-privilege identity for {plan.domain},\n"
        f"# rendered by appliance from {plan.source}\n"
        "# Apply with `kubectl apply -f -` (or `oc apply -f -`), then point\n"
        "# kubernetes.kubeconfig at a kubeconfig with the token of Secret\n"
        f"# {NAMESPACE}/{TOKEN_SECRET} (see the README).\n"
    )
    body = yaml.safe_dump_all(manifests(plan), sort_keys=False, default_flow_style=False)
    return head + "---\n" + body
