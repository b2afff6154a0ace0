"""The cluster loop (services/cluster) in-process against a fake kube-apiserver.

No kube-apiserver can run here: tests/fakekube.py stands in for it (HTTPS on
127.0.0.1, token auth from a generated kubeconfig, resourceVersions, list+watch,
410 Expired, 409 conflicts, the CSR approval subresource, OLM objects with phases,
pods with phases and logs). The cluster loop talks to it through kubernetes-asyncio
exactly as it would to a cluster; the tests play the cluster's controllers (kubelet,
OLM, NFD, the GPU operator). The proxy and http services are the real ones, started
by the real Supervisor.

Checked:
- approve legitimate client and serving CSRs, leave forged ones pending with the
  reason stored; a 410 on the watch relists without missing or double-approving;
  a CSR approved by someone else is left alone; node-ready events;
- bootstrap ConfigMap complete (+ etcd EtcdBootstrapMemberRemoved) -> the bootstrap
  backend is drained from the live api and machine_config pools, bootstrap.ign
  answers 410, bootstrap-complete is published; after a restart (API down) the
  drain is applied again at once;
- GPU bring-up from an empty cluster to gpu-validated, stopped in the middle and
  resumed by a new supervisor on the same store without redoing finished steps;
- an API outage (the server stops listening) survived: reconnect and approve;
- no kubeconfig: start is immediate, the wait is logged once, and the loop
  connects when the kubeconfig (default <ignition_dir>/auth/kubeconfig) appears;
- least privilege: the fake enforces RBAC from the very rules `render --as rbac`
  prints (applied with kubectl as the README says); with them the whole flow works,
  and with one rule removed only the worker that needs it backs off, reporting the
  exact rule, while the others (CSR approval above all) go on; a bug in one worker
  does not stop the others either.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from appliance.events import Event, Subscription
from appliance.registry import HTTP, PROXY
from appliance.service import ServiceSpec
from appliance.storequeue import DaemonStore
from appliance.supervisor import Supervisor, load_plan
from services.cluster import rbac
from services.cluster.gpu import Timeouts
from services.cluster.review import BOOTSTRAPPER, CLIENT_SIGNER, SERVING_SIGNER
from services.cluster.service import ClusterService, Timing
from tests.fakekube import FakeKube, kubelet_csr, tampered
from tests.helpers import free_port, loopback_inventory, need_tool, write_inventory
from tests.unit.test_gpu import A100_LOG, V100_LOG

D = "demo.example.com"
BOOTSTRAPPER_GROUPS = [
    "system:serviceaccounts",
    "system:serviceaccounts:openshift-machine-config-operator",
    "system:authenticated",
]
NODE_GROUPS = ["system:nodes", "system:authenticated"]
# The names the kubelet of worker-0 serves under (its inventory name, FQDN and address).
WORKER_0_SANS = {"dns": ["worker-0", f"worker-0.{D}"], "ips": ["127.0.0.44"]}
CLIENT = ["digital signature", "client auth"]
SERVING = ["digital signature", "server auth"]
FAST = Timing(
    backoff_first=0.05,
    backoff_max=0.3,
    stable=0.3,
    resync=0.3,
    watch_timeout=30.0,
    request_timeout=5.0,
    gpu_poll=0.05,
    gpu=Timeouts(retry=0.5),
)
WAIT = 15.0  # seconds any one condition may take on a loaded 2-CPU machine


def cluster_spec(timing: Timing = FAST) -> ServiceSpec:
    return ServiceSpec(
        "cluster", lambda ctx, plan: ClusterService(ctx, plan, timing), enabled=lambda p: True
    )


async def until(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"not reached within {timeout} s: {what}")


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[FakeKube]:
    kube = FakeKube(tmp_path / "fakekube")
    await kube.start()
    yield kube
    await kube.stop()


def inventory(
    tmp_path: Path, kubeconfig: Path | None, k8s: dict[str, Any] | None = None, **listen: str
) -> Path:
    raw = loopback_inventory(tmp_path)
    raw["nodes"].append(
        {"name": "worker-1", "role": "worker", "mac": "52:54:00:00:00:46", "ip": "127.0.0.46"}
    )
    for node in raw["nodes"]:
        if node["name"].startswith("worker"):
            node["gpu"] = True
    raw["listen"]["admin"] = None
    raw["listen"].update(listen)
    raw["kubernetes"] = {"kubeconfig": str(kubeconfig) if kubeconfig else None, **(k8s or {})}
    ignition = tmp_path / "ignition"
    ignition.mkdir(exist_ok=True)
    for role in ("bootstrap", "master", "worker"):
        (ignition / f"{role}.ign").write_text('{"ignition": {"version": "3.2.0"}}')
    return write_inventory(tmp_path / "inventory.yaml", raw)


async def started(config: Path, *specs: ServiceSpec) -> Supervisor:
    sup = Supervisor(config, specs=list(specs) or [cluster_spec()])
    await sup.start(load_plan(config))
    return sup


async def started_watching(config: Path, *specs: ServiceSpec) -> tuple[Supervisor, Subscription]:
    """Like started, subscribed to the bus before the start so that no event is missed."""
    sup = Supervisor(config, specs=list(specs) or [cluster_spec()])
    sub = sup.bus.subscribe()
    await sup.start(load_plan(config))
    return sup, sub


def cluster(sup: Supervisor) -> ClusterService:
    svc = sup.running["cluster"]
    assert isinstance(svc, ClusterService)
    return svc


def store(sup: Supervisor) -> DaemonStore:
    assert sup.store is not None  # opened by start()
    return sup.store


def seen(sub: Subscription, into: list[Event]) -> list[Event]:
    into.extend(sub.drain())
    return into


def client_csr(
    fake: FakeKube, name: str, node: str, *, by_node: bool = False, pem: bytes | None = None
) -> dict[str, Any]:
    """A kubelet client CSR for `node`: sent by the node bootstrapper (a first join) or,
    `by_node`, by the node itself (a renewal); `pem` replaces the kubelet's request."""
    return fake.create_csr(
        name,
        kubelet_csr(f"system:node:{node}") if pem is None else pem,
        signer=CLIENT_SIGNER,
        usages=CLIENT,
        username=f"system:node:{node}" if by_node else BOOTSTRAPPER,
        groups=NODE_GROUPS if by_node else BOOTSTRAPPER_GROUPS,
    )


def serving_csr(
    fake: FakeKube, name: str, node: str, *, dns: list[str], ips: list[str] | None = None
) -> dict[str, Any]:
    """A kubelet serving CSR for `node` with these SANs, sent by the node itself."""
    return fake.create_csr(
        name,
        kubelet_csr(f"system:node:{node}", dns=dns, ips=ips or []),
        signer=SERVING_SIGNER,
        usages=SERVING,
        username=f"system:node:{node}",
        groups=NODE_GROUPS,
    )


def conditions(fake: FakeKube, name: str) -> list[str]:
    obj = fake.get("certificatesigningrequests", name)
    assert obj is not None
    return [c["type"] for c in (obj.get("status") or {}).get("conditions") or []]


# --- the approver ----------------------------------------------------------------------------


async def test_approver_approves_legit_leaves_forged_and_survives_410(
    tmp_path: Path, fake: FakeKube
) -> None:
    config = inventory(tmp_path, fake.kubeconfig(tmp_path / "kubeconfig"))
    sup, sub = await started_watching(config)
    events: list[Event] = []
    try:
        svc = cluster(sup)
        await until(lambda: svc.connection["state"] == "connected", "connected")
        fake.add_node("worker-0", ready=True)  # exists: its bootstrapper CSRs are forgeries
        client_csr(fake, "csr-master-0", "master-0")
        client_csr(fake, "csr-intruder", "intruder")
        client_csr(
            fake, "csr-tampered", "master-0", pem=tampered(kubelet_csr("system:node:master-0"))
        )
        client_csr(fake, "csr-worker-0-again", "worker-0")
        serving_csr(fake, "csr-serving-worker-0", "worker-0", **WORKER_0_SANS)
        serving_csr(fake, "csr-serving-extra-san", "worker-0", dns=["worker-0", "api.evil.example"])
        await until(
            lambda: fake.approved["csr-master-0"] and fake.approved["csr-serving-worker-0"],
            "legit CSRs approved",
        )
        reasons = await until(
            lambda: (
                {
                    d["csr"]: d["reason"]
                    for d in store(sup).csr_decisions()
                    if d["decision"] == "pending"
                }
                if len(store(sup).csr_decisions()) >= 6
                else None
            ),
            "six decisions stored",
        )
        assert "'intruder' is not an inventory node" in reasons["csr-intruder"]
        assert "signature does not verify" in reasons["csr-tampered"]
        assert "node worker-0 already exists" in reasons["csr-worker-0-again"]
        assert "DNS SAN api.evil.example" in reasons["csr-serving-extra-san"]
        for name in ("csr-intruder", "csr-tampered", "csr-worker-0-again", "csr-serving-extra-san"):
            assert conditions(fake, name) == [], name
        approved = fake.get("certificatesigningrequests", "csr-master-0")
        assert approved is not None
        (cond,) = approved["status"]["conditions"]
        assert cond["type"] == "Approved" and cond["reason"] == "ApplianceApproved"
        assert "inventory node master-0" in cond["message"]

        # Someone else approves a CSR first: the approver must not touch it.
        other = client_csr(fake, "csr-preapproved", "worker-1")
        other["status"] = {
            "conditions": [{"type": "Approved", "status": "True", "reason": "Admin"}]
        }
        fake.put("certificatesigningrequests", other)

        # The watch is dropped with 410 and the history compacted; CSRs created right
        # then must be approved exactly once after the relist.
        lists_before = svc.approver.informer.lists if svc.approver.informer else 0
        fake.expire_watches()
        client_csr(fake, "csr-during-410", "worker-1")
        await until(lambda: fake.approved["csr-during-410"], "CSR created during the 410 approved")
        informer = svc.approver.informer
        assert informer is not None and informer.gone >= 1 and informer.lists > lists_before
        client_csr(fake, "csr-after-410", "master-0", by_node=True)
        await until(lambda: fake.approved["csr-after-410"], "renewal after the relist approved")
        await asyncio.sleep(3 * FAST.resync)  # a few more review rounds: nothing changes
        assert fake.approval_puts["csr-preapproved"] == 0
        for name in ("csr-master-0", "csr-serving-worker-0", "csr-during-410", "csr-after-410"):
            assert fake.approval_puts[name] == 1 and fake.approved[name] == 1, name
        assert sum(fake.approval_puts.values()) == 4
        # Each forgery is stored once, not once per review round.
        rows = store(sup).csr_decisions()
        assert sum(1 for r in rows if r["csr"] == "csr-intruder") == 1

        stages = {(e.node, e.stage) for e in seen(sub, events) if e.ok}
        assert ("master-0", "csr-client") in stages and ("worker-0", "csr-serving") in stages
        assert ("worker-1", "csr-client") in stages
        # Refusals about inventory nodes are published too, once each, marked not ok
        # (a CSR whose signature fails names no node it could be trusted for).
        refused = [e for e in seen(sub, events) if not e.ok]
        assert sorted(e.detail.split(" ")[0] for e in refused) == [
            "csr-serving-extra-san",
            "csr-worker-0-again",
        ]
        assert all(e.source == "cluster" and "left pending" in e.detail for e in refused)
        assert "csr-serving" not in store(sup).progress().get("worker-1", {})
        status = svc.status().to_json()
        assert status["csr"]["approved"] == 4 and status["csr"]["watch_410"] >= 1
        assert status["csr"]["decisions"]["pending"] >= 4
        assert status["connection"]["state"] == "connected"

        # Node readiness: one event when Ready turns true.
        fake.add_node("master-0", ready=False)
        await asyncio.sleep(0.2)
        assert ("master-0", "node-ready") not in {(e.node, e.stage) for e in seen(sub, events)}
        fake.set_node_ready("master-0", True)
        await until(
            lambda: ("master-0", "node-ready") in {(e.node, e.stage) for e in seen(sub, events)},
            "node-ready for master-0",
        )
        assert ("worker-0", "node-ready") in {(e.node, e.stage) for e in events}
    finally:
        sub.close()
        await sup.stop()


async def test_api_outage_is_survived(tmp_path: Path, fake: FakeKube) -> None:
    """Also: Nodes are known before the first review, and deny_unmatched denies."""
    config = inventory(
        tmp_path, fake.kubeconfig(tmp_path / "kubeconfig"), k8s={"deny_unmatched": True}
    )
    # Before the loop starts: worker-1 exists, and a bootstrapper asks for its certificate.
    fake.add_node("worker-1", ready=True)
    client_csr(fake, "csr-worker-1-again", "worker-1")
    fake.list_delay["nodes"] = 0.5  # the Node list arrives well after the CSR list
    sup = await started(config)
    try:
        svc = cluster(sup)
        await until(lambda: svc.connection["state"] == "connected", "connected")
        await until(lambda: conditions(fake, "csr-worker-1-again"), "a decision on the forgery")
        fake.list_delay.clear()
        assert conditions(fake, "csr-worker-1-again") == ["Denied"]
        assert fake.approved["csr-worker-1-again"] == 0
        await fake.stop()  # the API goes away, open watches are cut
        await until(lambda: svc.connection["state"] == "unreachable", "outage noticed")
        client_csr(fake, "csr-while-down", "master-0")
        await asyncio.sleep(0.5)  # several failed reconnects, backed off
        assert svc.connection["state"] == "unreachable"
        await fake.resume()
        await until(lambda: fake.approved["csr-while-down"], "approved after the outage")
        assert svc.connects >= 2 and svc.connection["state"] == "connected"
    finally:
        await sup.stop()


async def test_breaker_and_rate_limit(tmp_path: Path, fake: FakeKube) -> None:
    """A flood of pending CSRs stops all approvals until it is gone; approvals are paced."""
    config = inventory(
        tmp_path,
        fake.kubeconfig(tmp_path / "kubeconfig"),
        k8s={"approvals_per_minute": 300, "approval_burst": 1},  # one per 0.2 s
    )
    junk = kubelet_csr("system:node:nobody")
    for i in range(4 + 100 + 1):  # inventory nodes + MARGIN + 1
        fake.create_csr(
            f"junk-{i}",
            junk,
            signer="example.com/spam",
            usages=CLIENT,
            username="mallory",
            groups=["system:authenticated"],
        )
    for node in ("master-0", "worker-0", "worker-1"):
        client_csr(fake, f"csr-{node}", node)
    sup = await started(config)
    try:
        svc = cluster(sup)
        await until(lambda: svc.status().csr["breaker_open"], "breaker open")
        await asyncio.sleep(3 * FAST.resync)
        assert sum(fake.approval_puts.values()) == 0
        reason = next(d["reason"] for d in store(sup).csr_decisions() if d["csr"] == "csr-master-0")
        assert str(reason).startswith("circuit breaker open: 108 pending CSRs exceed 4 nodes + 100")
        for i in range(105):
            fake.remove("certificatesigningrequests", f"junk-{i}")
        t0 = time.monotonic()
        await until(
            lambda: all(fake.approved[f"csr-{n}"] for n in ("master-0", "worker-0", "worker-1")),
            "approved once the flood is gone",
        )
        assert time.monotonic() - t0 >= 0.35  # the 2nd and 3rd waited for tokens
        assert not svc.status().csr["breaker_open"]
        limited = [d for d in store(sup).csr_decisions() if d["reason"] == "rate limited"]
        assert limited, "the rate limit held some back"
    finally:
        await sup.stop()


# --- bootstrap retirement ----------------------------------------------------------------------


def backend_admin(sup: Supervisor, frontend: str, node: str) -> str:
    status = sup.running["proxy"].status().to_json()
    for backend in status["frontends"][frontend]["backends"]:
        if backend["name"] == node:
            return str(backend["admin"])
    raise KeyError(node)


async def fetch_bootstrap_ign(http_port: int) -> int:
    # From the bootstrap node's address, as the node itself would ask.
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.53", 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        url = f"http://127.0.0.1:{http_port}/ignition/bootstrap.ign"
        async with session.get(url) as resp:
            await resp.read()
            return resp.status


async def test_bootstrap_complete_drains_the_bootstrap_backend(
    tmp_path: Path, fake: FakeKube
) -> None:
    http_port = free_port()
    config = inventory(
        tmp_path,
        fake.kubeconfig(tmp_path / "kubeconfig"),
        http=f"127.0.0.1:{http_port}",
        api=f"127.0.0.54:{free_port(host='127.0.0.54')}",
        machine_config=f"127.0.0.54:{free_port(host='127.0.0.54')}",
    )
    sup, sub = await started_watching(config, HTTP, PROXY, cluster_spec())
    try:
        svc = cluster(sup)
        await until(lambda: svc.connection["state"] == "connected", "connected")
        assert await fetch_bootstrap_ign(http_port) == 200
        fake.set_configmap("kube-system", "bootstrap", {"status": "progressing"})
        # The cluster has the etcd operator; its bootstrap member is not removed yet.
        fake.serve_kind("etcds")
        etcd: dict[str, Any] = {"metadata": {"name": "cluster"}, "status": {"conditions": []}}
        etcd["status"]["conditions"] = [
            {"type": "EtcdBootstrapMemberRemoved", "status": "False", "message": "waiting"}
        ]
        fake.put("etcds", etcd)
        await asyncio.sleep(3 * FAST.resync)
        fake.set_configmap("kube-system", "bootstrap", {"status": "complete"})
        await until(
            lambda: (
                "EtcdBootstrapMemberRemoved is False"
                in (svc.status().bootstrap["waiting_for"] or "")
            ),
            "waiting for the etcd condition",
        )
        assert backend_admin(sup, "api", "bootstrap") == "enabled"
        etcd["status"]["conditions"][0]["status"] = "True"
        fake.put("etcds", etcd)
        await until(lambda: svc.status().bootstrap["complete"], "bootstrap complete")
        for frontend in ("api", "machine_config"):
            assert backend_admin(sup, frontend, "bootstrap") == "drain"
            assert backend_admin(sup, frontend, "master-0") == "enabled"
        assert await fetch_bootstrap_ign(http_port) == 410
        stored = store(sup).cluster_state("bootstrap")
        assert stored["complete"] and sorted(stored["drained"]) == [
            "api/bootstrap",
            "machine_config/bootstrap",
        ]
        (event,) = [e for e in sub.drain() if e.stage == "bootstrap-complete"]
        assert event.node == "bootstrap" and "etcd bootstrap member removed" in event.detail
    finally:
        sub.close()
        await sup.stop()

    # A restart with the API down: the proxy starts with the backend enabled, and the
    # cluster loop drains it again from the store at once.
    await fake.stop()
    sup = await started(config, HTTP, PROXY, cluster_spec())
    try:
        assert backend_admin(sup, "api", "bootstrap") == "drain"
        assert backend_admin(sup, "machine_config", "bootstrap") == "drain"
        assert await fetch_bootstrap_ign(http_port) == 410
    finally:
        await sup.stop()


# --- GPU bring-up ------------------------------------------------------------------------------


NFD_EXAMPLE = {
    "apiVersion": "nfd.openshift.io/v1",
    "kind": "NodeFeatureDiscovery",
    "metadata": {"name": "nfd-instance", "namespace": "openshift-nfd"},
    "spec": {"operand": {"image": "registry.redhat.io/openshift4/ose-node-feature-discovery"}},
}
POLICY_EXAMPLE = {
    "apiVersion": "nvidia.com/v1",
    "kind": "ClusterPolicy",
    "metadata": {"name": "gpu-cluster-policy"},
    "spec": {"driver": {"enabled": True}, "toolkit": {"enabled": True}},
}
GPU_LABEL = {"feature.node.kubernetes.io/pci-10de.present": "true"}
CREATES = (
    "/api/v1/namespaces",
    "/operatorgroups",
    "/subscriptions",
    "/nodefeaturediscoveries",
    "/clusterpolicies",
)


def gpu_status(sup: Supervisor) -> dict[str, Any]:
    return dict(cluster(sup).status().gpu)


async def test_gpu_bring_up_resumes_after_a_restart(tmp_path: Path, fake: FakeKube) -> None:
    config = inventory(tmp_path, fake.kubeconfig(tmp_path / "kubeconfig"))
    sup, sub = await started_watching(config)
    events: list[Event] = []
    try:
        await until(lambda: fake.get("subscriptions", "nfd", "openshift-nfd"), "NFD Subscription")
        assert fake.get("namespaces", "openshift-nfd") is not None
        og = fake.get("operatorgroups", "openshift-nfd", "openshift-nfd")
        assert og is not None and og["spec"]["targetNamespaces"] == ["openshift-nfd"]
        nfd_sub = fake.get("subscriptions", "nfd", "openshift-nfd")
        assert nfd_sub is not None
        assert nfd_sub["spec"]["source"] == "redhat-operators" and nfd_sub["spec"]["name"] == "nfd"
        await until(
            lambda: "OLM to resolve Subscription nfd" in gpu_status(sup)["status"], "OLM wait"
        )
        fake.olm_resolve(
            "openshift-nfd",
            "nfd",
            "nfd.4.14.0",
            alm_examples=[NFD_EXAMPLE],
            crds=["nodefeaturediscoveries"],
        )
        await until(
            lambda: gpu_status(sup)["status"].startswith("waiting for CSV nfd: Installing for "),
            "status text of the CSV wait",
        )
        fake.set_csv_phase("openshift-nfd", "nfd.4.14.0", "Succeeded")
        nfd = await until(
            lambda: fake.get("nodefeaturediscoveries", "nfd-instance", "openshift-nfd"),
            "NodeFeatureDiscovery created",
        )
        assert nfd["spec"] == NFD_EXAMPLE["spec"]  # from the CSV's own example
        # The workers join (worker-0 under its FQDN); NFD labels them one after another.
        fake.add_node(f"worker-0.{D}", ready=True)
        fake.add_node("worker-1", ready=True)
        await until(
            lambda: "NFD label pci-10de on worker-0, worker-1" in gpu_status(sup)["status"],
            "label wait",
        )
        fake.label_node(f"worker-0.{D}", GPU_LABEL)
        await until(lambda: gpu_status(sup)["discovered"] == ["worker-0"], "worker-0 discovered")
        fake.label_node("worker-1", {"feature.node.kubernetes.io/pci-0302_10de.present": "true"})
        await until(
            lambda: fake.get("subscriptions", "gpu-operator-certified", "nvidia-gpu-operator"),
            "GPU operator Subscription",
        )
        await until(lambda: gpu_status(sup)["step"] == "gpu-csv", "at gpu-csv")
        finished_before = gpu_status(sup)["finished"]
    finally:
        await sup.stop()  # stopped in the middle of the bring-up
    stages = [(e.node, e.stage) for e in seen(sub, events)]
    assert stages.count(("worker-0", "gpu-discovered")) == 1
    assert stages.count(("worker-1", "gpu-discovered")) == 1
    sub.close()
    creates_before = {path: fake.count("POST", path) for path in CREATES}
    assert creates_before["/nodefeaturediscoveries"] == 1

    # A new supervisor on the same store continues at gpu-csv.
    sup, sub = await started_watching(config)
    events = []
    try:
        assert gpu_status(sup)["step"] == "gpu-csv"
        fake.olm_resolve(
            "nvidia-gpu-operator",
            "gpu-operator-certified",
            "gpu-operator-certified.v24.3.0",
            alm_examples=[POLICY_EXAMPLE],
            crds=["clusterpolicies"],
        )
        await until(
            lambda: gpu_status(sup)["status"].startswith(
                "waiting for CSV gpu-operator-certified: Installing for "
            ),
            "status text of the GPU CSV wait",
        )
        fake.set_csv_phase("nvidia-gpu-operator", "gpu-operator-certified.v24.3.0", "Succeeded")
        policy = await until(
            lambda: fake.get("clusterpolicies", "gpu-cluster-policy"), "ClusterPolicy created"
        )
        assert policy["spec"] == POLICY_EXAMPLE["spec"]
        fake.set_policy_state("gpu-cluster-policy", "notReady")
        await until(
            lambda: "ClusterPolicy gpu-cluster-policy: notReady" in gpu_status(sup)["status"],
            "policy wait",
        )
        fake.set_policy_state("gpu-cluster-policy", "ready")
        # The pods ask for all of a node's GPUs: none before the device plugin says how many.
        await until(
            lambda: "Node worker-0: no nvidia.com/gpu allocatable yet" in gpu_status(sup)["status"],
            "allocatable wait",
        )
        assert fake.items("pods", "nvidia-gpu-operator") == []
        fake.set_allocatable_gpus(f"worker-0.{D}", 2)
        fake.set_allocatable_gpus("worker-1", 1)
        pods = await until(
            lambda: (
                len(fake.items("pods", "nvidia-gpu-operator")) == 2
                and fake.items("pods", "nvidia-gpu-operator")
            ),
            "two nvidia-smi pods",
        )
        selectors = sorted(p["spec"]["nodeSelector"]["kubernetes.io/hostname"] for p in pods)
        assert selectors == [f"worker-0.{D}", "worker-1"]
        for pod in pods:
            (container,) = pod["spec"]["containers"]
            gpus = 2 if pod["metadata"]["name"] == "nvidia-smi-worker-0" else 1
            assert container["resources"]["limits"] == {"nvidia.com/gpu": gpus}
            assert pod["spec"]["restartPolicy"] == "Never"
        fake.set_pod_phase("nvidia-gpu-operator", "nvidia-smi-worker-0", "Running")
        await until(
            lambda: "pod nvidia-smi-worker-0: Running" in gpu_status(sup)["status"], "pod wait"
        )
        fake.set_pod_phase("nvidia-gpu-operator", "nvidia-smi-worker-0", "Succeeded", V100_LOG)
        fake.set_pod_phase("nvidia-gpu-operator", "nvidia-smi-worker-1", "Succeeded", A100_LOG)
        await until(lambda: gpu_status(sup)["step"] == "done", "bring-up done")
        assert fake.items("pods", "nvidia-gpu-operator") == []  # the pods are deleted
        stored = store(sup).cluster_state("gpu")
        assert stored["step"] == "done"
        w0, w1 = stored["validated"]["worker-0"], stored["validated"]["worker-1"]
        assert (w0["count"], w0["driver"], w0["cuda"]) == (2, "418.40.04", "10.1")
        assert w0["models"] == {"Tesla V100-SXM2...": 2}
        assert (w1["count"], w1["models"]) == (1, {"NVIDIA A100-SXM4-80GB": 1})
        # Nothing done before the restart was created again.
        assert creates_before["/api/v1/namespaces"] == 2  # openshift-nfd, nvidia-gpu-operator
        assert creates_before["/subscriptions"] == 2
        for path in CREATES[:-1]:
            assert fake.count("POST", path) == creates_before[path], path
        assert fake.count("POST", "/clusterpolicies") == 1
        assert list(finished_before) == [
            "nfd-operator",
            "nfd-csv",
            "nfd-instance",
            "gpu-labels",
            "gpu-operator",
        ]
        for step, when in finished_before.items():
            assert stored["finished"][step] == when, step  # not done again
        stages = [(e.node, e.stage) for e in seen(sub, events)]
        for node in ("worker-0", "worker-1"):
            assert stages.count((node, "gpu-operator-ready")) == 1
            assert stages.count((node, "gpu-validated")) == 1
            assert (node, "gpu-discovered") not in stages  # published before the restart
        detail = next(
            e.detail for e in events if e.stage == "gpu-validated" and e.node == "worker-0"
        )
        assert detail == "2x Tesla V100-SXM2..., driver 418.40.04, CUDA 10.1"
    finally:
        sub.close()
        await sup.stop()


async def test_failed_validation_is_recorded_and_retried(tmp_path: Path, fake: FakeKube) -> None:
    """A pod whose nvidia-smi found no driver fails the step; the retry validates it."""
    config = inventory(tmp_path, fake.kubeconfig(tmp_path / "kubeconfig"))
    # Start at validate: the steps before it are covered by the test above.
    sup0 = Supervisor(config, specs=[])
    await sup0.start(load_plan(config))
    assert sup0.store is not None
    sup0.store.set_cluster_state(
        "gpu",
        {"step": "validate", "since": time.time(), "discovered": ["worker-0", "worker-1"]},
        time.time(),
    )
    await sup0.stop()
    fake.add_node("worker-0", ready=True, labels=GPU_LABEL)
    fake.add_node("worker-1", ready=True, labels=GPU_LABEL)
    fake.set_allocatable_gpus("worker-0", 2)
    fake.set_allocatable_gpus("worker-1", 1)
    fake.put("namespaces", {"metadata": {"name": "nvidia-gpu-operator"}})
    sup = await started(config)
    try:
        await until(lambda: len(fake.items("pods", "nvidia-gpu-operator")) == 2, "pods")
        fake.set_pod_phase("nvidia-gpu-operator", "nvidia-smi-worker-0", "Succeeded", V100_LOG)
        fake.set_pod_phase(
            "nvidia-gpu-operator",
            "nvidia-smi-worker-1",
            "Failed",
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.",
        )
        status = await until(
            lambda: gpu_status(sup) if gpu_status(sup)["failed"] else None, "validate failed"
        )
        assert "worker-1: pod Failed: NVIDIA-SMI has failed" in status["failed"]
        assert status["validated"]["worker-0"]["ok"] is True
        # The retry (0.5 s here) runs only worker-1 again.
        await until(
            lambda: fake.get("pods", "nvidia-smi-worker-1", "nvidia-gpu-operator"), "retry pod"
        )
        assert fake.get("pods", "nvidia-smi-worker-0", "nvidia-gpu-operator") is None
        fake.set_pod_phase("nvidia-gpu-operator", "nvidia-smi-worker-1", "Succeeded", A100_LOG)
        await until(lambda: gpu_status(sup)["step"] == "done", "done after the retry")
        validated = gpu_status(sup)["validated"]
        assert validated["worker-1"]["ok"] and validated["worker-1"]["count"] == 1
    finally:
        await sup.stop()


async def test_gpu_settings_reach_the_cluster(tmp_path: Path, fake: FakeKube) -> None:
    """kubernetes.gpu: a mirror catalog, a pinned channel and CSV, a ClusterPolicy override;
    a node that advertises more GPUs than nvidia-smi lists fails its validation."""
    settings = {
        "operator": {
            "catalog_source": "certified-mirror",
            "catalog_namespace": "mirrors",
            "channel": "v24.3",
            "starting_csv": "gpu-operator-certified.v24.3.0",
        },
        "cluster_policy": {"driver": {"version": "535.161.08"}, "mig": {"strategy": "mixed"}},
    }
    config = inventory(tmp_path, fake.kubeconfig(tmp_path / "kubeconfig"), {"gpu": settings})
    sup0 = Supervisor(config, specs=[])
    await sup0.start(load_plan(config))
    assert sup0.store is not None
    sup0.store.set_cluster_state(
        "gpu",
        {"step": "gpu-operator", "since": time.time(), "discovered": ["worker-0", "worker-1"]},
        time.time(),
    )
    await sup0.stop()
    for name, gpus in (("worker-0", 8), ("worker-1", 1)):
        fake.add_node(name, ready=True, labels=GPU_LABEL)
        fake.set_allocatable_gpus(name, gpus)
    sup = await started(config)
    try:
        sub = await until(
            lambda: fake.get("subscriptions", "gpu-operator-certified", "nvidia-gpu-operator"),
            "GPU operator Subscription",
        )
        assert sub["spec"]["source"] == "certified-mirror"
        assert sub["spec"]["sourceNamespace"] == "mirrors"
        assert sub["spec"]["channel"] == "v24.3"
        assert sub["spec"]["startingCSV"] == "gpu-operator-certified.v24.3.0"
        fake.olm_resolve(
            "nvidia-gpu-operator",
            "gpu-operator-certified",
            "gpu-operator-certified.v24.3.0",
            phase="Succeeded",
            alm_examples=[POLICY_EXAMPLE],
            crds=["clusterpolicies"],
        )
        policy = await until(
            lambda: fake.get("clusterpolicies", "gpu-cluster-policy"), "ClusterPolicy created"
        )
        assert policy["spec"] == {
            "driver": {"enabled": True, "version": "535.161.08"},
            "toolkit": {"enabled": True},
            "mig": {"strategy": "mixed"},
        }
        fake.set_policy_state("gpu-cluster-policy", "ready")
        await until(lambda: len(fake.items("pods", "nvidia-gpu-operator")) == 2, "pods")
        pod = fake.get("pods", "nvidia-smi-worker-0", "nvidia-gpu-operator")
        assert pod is not None
        assert pod["spec"]["containers"][0]["resources"]["requests"] == {"nvidia.com/gpu": 8}
        fake.set_pod_phase("nvidia-gpu-operator", "nvidia-smi-worker-0", "Succeeded", V100_LOG)
        fake.set_pod_phase("nvidia-gpu-operator", "nvidia-smi-worker-1", "Succeeded", A100_LOG)
        status = await until(
            lambda: gpu_status(sup) if gpu_status(sup)["failed"] else None, "validate failed"
        )
        assert (
            "worker-0: nvidia-smi lists 2 GPUs, the node has 8 (nvidia.com/gpu allocatable)"
            in status["failed"]
        )
        w0, w1 = status["validated"]["worker-0"], status["validated"]["worker-1"]
        assert (w0["ok"], w0["count"], w0["expected"]) == (False, 2, 8)
        assert (w1["ok"], w1["count"], w1["expected"]) == (True, 1, 1)
    finally:
        await sup.stop()


async def test_one_gpu_validation_when_asked(tmp_path: Path, fake: FakeKube) -> None:
    """validate_all_gpus: false is the earlier behaviour: one GPU, no allocatable needed."""
    k8s = {"gpu": {"validate_all_gpus": False}}
    config = inventory(tmp_path, fake.kubeconfig(tmp_path / "kubeconfig"), k8s)
    sup0 = Supervisor(config, specs=[])
    await sup0.start(load_plan(config))
    assert sup0.store is not None
    sup0.store.set_cluster_state(
        "gpu",
        {"step": "validate", "since": time.time(), "discovered": ["worker-0", "worker-1"]},
        time.time(),
    )
    await sup0.stop()
    fake.add_node("worker-0", ready=True, labels=GPU_LABEL)  # no allocatable advertised
    fake.add_node("worker-1", ready=True, labels=GPU_LABEL)
    fake.put("namespaces", {"metadata": {"name": "nvidia-gpu-operator"}})
    sup = await started(config)
    try:
        pods = await until(
            lambda: (
                len(fake.items("pods", "nvidia-gpu-operator")) == 2
                and fake.items("pods", "nvidia-gpu-operator")
            ),
            "pods",
        )
        for pod in pods:
            assert pod["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 1}
        fake.set_pod_phase("nvidia-gpu-operator", "nvidia-smi-worker-0", "Succeeded", V100_LOG)
        fake.set_pod_phase("nvidia-gpu-operator", "nvidia-smi-worker-1", "Succeeded", A100_LOG)
        await until(lambda: gpu_status(sup)["step"] == "done", "done")
        assert gpu_status(sup)["validated"]["worker-0"]["count"] == 2
    finally:
        await sup.stop()


# --- no kubeconfig -----------------------------------------------------------------------------


async def test_without_kubeconfig_it_waits_quietly_then_connects(
    tmp_path: Path, fake: FakeKube, caplog: pytest.LogCaptureFixture
) -> None:
    http_port = free_port()
    config = inventory(tmp_path, None, http=f"127.0.0.1:{http_port}")  # the default path
    caplog.set_level(logging.INFO, logger="appliance.cluster")
    t0 = time.monotonic()
    sup = await started(config, HTTP, cluster_spec())
    try:
        assert time.monotonic() - t0 < 2.0  # start (and READY) does not wait for a cluster
        svc = cluster(sup)
        await until(
            lambda: svc.connection["state"] == "waiting-for-kubeconfig", "waiting for kubeconfig"
        )
        await asyncio.sleep(1.0)  # several back-off rounds
        said = [r for r in caplog.records if "waiting for the kubeconfig" in r.getMessage()]
        assert len(said) == 1
        assert svc.connection["detail"] == str(tmp_path / "ignition" / "auth" / "kubeconfig")
        # The other services serve meanwhile.
        url = f"http://127.0.0.1:{http_port}/healthz"
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            assert resp.status == 200
        fake.kubeconfig(tmp_path / "ignition" / "auth" / "kubeconfig")
        await until(lambda: svc.connection["state"] == "connected", "connected once it appears")
    finally:
        await sup.stop()


# --- least privilege: the rendered RBAC, enforced by the fake ---------------------------------


SA_KUBECONFIG = "sa.kubeconfig"  # below tmp_path: the ServiceAccount's, by least_privilege


def least_privilege(
    fake: FakeKube,
    tmp_path: Path,
    *,
    without_cluster_rule: str = "",
    without_role_in: str = "",
    without_signer: str = "",
) -> Path:
    """The inventory (returned) of a cluster loop that uses the ServiceAccount: apply
    `render --as rbac`'s objects (minus one rule or Role, to see it missed), then write the
    ServiceAccount's kubeconfig from its token Secret, as the README says."""
    kubeconfig = tmp_path / SA_KUBECONFIG
    config = inventory(tmp_path, kubeconfig)
    plan = load_plan(config)
    cluster_rules = [
        r for r in rbac.cluster_rules(plan) if without_cluster_rule not in r["resources"]
    ]
    for rule in cluster_rules:
        if without_signer in rule.get("resourceNames", []):
            rule["resourceNames"].remove(without_signer)
    namespaced = {ns: r for ns, r in rbac.namespaced_rules(plan).items() if ns != without_role_in}
    fake.apply(rbac.manifests(plan, cluster_rules, namespaced))
    secret = fake.get("secrets", rbac.TOKEN_SECRET, rbac.NAMESPACE)
    assert secret is not None
    token = base64.b64decode(secret["data"]["token"]).decode()
    fake.kubeconfig(kubeconfig, token)
    return config


def workers(svc: ClusterService) -> Mapping[str, Mapping[str, Any]]:
    return svc.status().workers


async def forbidden(svc: ClusterService, worker: str, what: str) -> dict[str, Any]:
    """The worker's state once it reports a refusal by RBAC."""
    state: dict[str, Any] = await until(
        lambda: (w := workers(svc)[worker])["state"] == "forbidden" and w, what
    )
    return state


def grant(fake: FakeKube, rule: dict[str, Any]) -> None:
    """The operator adds the missing rule to the ClusterRole."""
    role = fake.get("clusterroles", rbac.NAME)
    assert role is not None
    role["rules"].append(rule)
    fake.put("clusterroles", role)


async def test_a_forbidden_etcd_read_stops_only_the_bootstrap_watcher(
    tmp_path: Path, fake: FakeKube, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 14, item 22: the role lacks `get etcds`; CSRs are approved all the same."""
    caplog.set_level(logging.INFO, logger="appliance.cluster")
    config = least_privilege(fake, tmp_path, without_cluster_rule="etcds")
    fake.serve_kind("etcds")
    fake.put("etcds", {"metadata": {"name": "cluster"}, "status": {"conditions": []}})
    fake.set_configmap("kube-system", "bootstrap", {"status": "complete"})
    sup = await started(config)
    try:
        svc = cluster(sup)
        fake.add_node("worker-0", ready=True)
        client_csr(fake, "csr-master-0", "master-0")
        await until(lambda: fake.approved["csr-master-0"], "the CSR approved")
        state = await forbidden(svc, "bootstrap", "the bootstrap watcher reports the missing rule")
        assert state["missing"]["rule"] == {
            "apiGroups": ["operator.openshift.io"],
            "resources": ["etcds"],
            "verbs": ["get"],
            "resourceNames": ["cluster"],
        }
        assert 'get etcds.operator.openshift.io "cluster" at the cluster scope' in state["detail"]
        assert 'User "system:serviceaccount:appliance:appliance-cluster-loop"' in state["detail"]
        # It backs off alone: several rounds later the others never restarted.
        await asyncio.sleep(5 * FAST.backoff_max)
        assert workers(svc)["bootstrap"]["failures"] >= 2
        assert not svc.status().bootstrap["complete"]  # not retired on a guess
        for name in ("csr", "nodes", "gpu"):
            assert workers(svc)[name]["state"] == "ok", (name, workers(svc)[name])
            assert workers(svc)[name]["failures"] == 0, name
        informer = svc.approver.informer
        assert informer is not None and informer.lists == 1  # the CSR watch was never cut
        assert svc.connection["state"] == "connected" and svc.connects == 1
        # New CSRs keep being approved meanwhile, and nodes reported Ready.
        serving_csr(fake, "csr-serving-worker-0", "worker-0", **WORKER_0_SANS)
        await until(lambda: fake.approved["csr-serving-worker-0"], "a later CSR approved")
        said = [r.getMessage() for r in caplog.records if "forbidden" in r.getMessage()]
        assert len(said) == 1, said  # once, not once per retry
        assert 'resources: ["etcds"]' in said[0] and "render --as rbac" in said[0]
        # The operator adds the rule: the watcher gets on and retires the bootstrap node.
        grant(fake, state["missing"]["rule"])
        etcd: dict[str, Any] = {"metadata": {"name": "cluster"}, "status": {"conditions": []}}
        etcd["status"]["conditions"] = [{"type": "EtcdBootstrapMemberRemoved", "status": "True"}]
        fake.put("etcds", etcd)
        await until(lambda: svc.status().bootstrap["complete"], "retired once allowed")
        await until(lambda: workers(svc)["bootstrap"]["state"] == "ok", "the watcher is ok")
    finally:
        await sup.stop()


async def test_the_rendered_role_is_enough_for_the_whole_flow(
    tmp_path: Path, fake: FakeKube, caplog: pytest.LogCaptureFixture
) -> None:
    """CSR approval, bootstrap retirement, node-ready and GPU bring-up as the ServiceAccount."""
    caplog.set_level(logging.WARNING, logger="appliance.cluster")
    config = least_privilege(fake, tmp_path)
    fake.serve_kind("etcds")
    removed = {"type": "EtcdBootstrapMemberRemoved", "status": "True"}
    fake.put("etcds", {"metadata": {"name": "cluster"}, "status": {"conditions": [removed]}})
    sup, sub = await started_watching(config)
    events: list[Event] = []
    try:
        svc = cluster(sup)
        client_csr(fake, "csr-worker-0", "worker-0")
        await until(lambda: fake.approved["csr-worker-0"], "client CSR approved")
        fake.add_node("worker-0", ready=True)
        fake.add_node("worker-1", ready=True)
        serving_csr(fake, "csr-serving-worker-0", "worker-0", **WORKER_0_SANS)
        await until(lambda: fake.approved["csr-serving-worker-0"], "serving CSR approved")
        fake.set_configmap("kube-system", "bootstrap", {"status": "complete"})
        await until(lambda: svc.status().bootstrap["complete"], "bootstrap retired")
        # The GPU bring-up, the test playing OLM, NFD and the GPU operator.
        await until(lambda: fake.get("subscriptions", "nfd", "openshift-nfd"), "NFD Subscription")
        fake.olm_resolve(
            "openshift-nfd", "nfd", "nfd.4.14.0", phase="Succeeded", alm_examples=[NFD_EXAMPLE]
        )
        fake.serve_kind("nodefeaturediscoveries")
        await until(
            lambda: fake.get("nodefeaturediscoveries", "nfd-instance", "openshift-nfd"), "NFD"
        )
        fake.label_node("worker-0", GPU_LABEL)
        fake.label_node("worker-1", GPU_LABEL)
        await until(
            lambda: fake.get("subscriptions", "gpu-operator-certified", "nvidia-gpu-operator"),
            "GPU operator Subscription",
        )
        fake.olm_resolve(
            "nvidia-gpu-operator",
            "gpu-operator-certified",
            "gpu-operator-certified.v24.3.0",
            phase="Succeeded",
            alm_examples=[POLICY_EXAMPLE],
            crds=["clusterpolicies"],
        )
        await until(lambda: fake.get("clusterpolicies", "gpu-cluster-policy"), "ClusterPolicy")
        fake.set_policy_state("gpu-cluster-policy", "ready")
        fake.set_allocatable_gpus("worker-0", 2)  # the device plugin runs now
        fake.set_allocatable_gpus("worker-1", 1)
        await until(lambda: len(fake.items("pods", "nvidia-gpu-operator")) == 2, "smi pods")
        fake.set_pod_phase("nvidia-gpu-operator", "nvidia-smi-worker-0", "Succeeded", V100_LOG)
        fake.set_pod_phase("nvidia-gpu-operator", "nvidia-smi-worker-1", "Succeeded", A100_LOG)
        await until(lambda: gpu_status(sup)["step"] == "done", "GPU bring-up done")
        assert fake.items("pods", "nvidia-gpu-operator") == []
        stages = {(e.node, e.stage) for e in seen(sub, events)}
        for node in ("worker-0", "worker-1"):
            for stage in ("node-ready", "gpu-discovered", "gpu-operator-ready", "gpu-validated"):
                assert (node, stage) in stages, (node, stage)
        assert ("worker-0", "csr-client") in stages and ("worker-0", "csr-serving") in stages
        assert fake.refused == [], fake.refused  # nothing it does needs more than the role
        assert all(w["state"] == "ok" for w in workers(svc).values()), workers(svc)
        assert not [r for r in caplog.records if "forbidden" in r.getMessage()]
        # The loop never asked for more than the role gives: no namespace creation.
        assert fake.count("POST", "/api/v1/namespaces") == 0
    finally:
        sub.close()
        await sup.stop()


async def test_without_the_gpu_role_only_the_gpu_bring_up_waits(
    tmp_path: Path, fake: FakeKube
) -> None:
    """The GPU operator's namespace Role is missing: the GPU worker reports the exact rule
    and backs off; CSRs are approved and nodes seen meanwhile."""
    config = least_privilege(fake, tmp_path, without_role_in="openshift-nfd")
    sup = await started(config)
    try:
        svc = cluster(sup)
        state = await forbidden(svc, "gpu", "the GPU worker reports the missing rule")
        assert state["missing"]["rule"] == {
            "apiGroups": ["operators.coreos.com"],
            "resources": ["operatorgroups"],
            "verbs": ["create"],
        }
        assert state["missing"]["namespace"] == "openshift-nfd"
        assert "create operatorgroups.operators.coreos.com" in state["detail"]
        assert 'in the namespace "openshift-nfd"' in state["detail"]
        client_csr(fake, "csr-master-0", "master-0")
        await until(lambda: fake.approved["csr-master-0"], "the CSR approved meanwhile")
        fake.add_node("master-0", ready=True)
        await until(lambda: list(svc.status().nodes_ready) == ["master-0"], "node seen")
        await asyncio.sleep(4 * FAST.backoff_max)
        assert workers(svc)["gpu"]["state"] == "forbidden"
        assert workers(svc)["gpu"]["failures"] >= 2  # backed off and tried again
        for name in ("csr", "nodes", "bootstrap"):
            assert workers(svc)[name]["state"] == "ok", (name, workers(svc)[name])
        assert gpu_status(sup)["step"] == "nfd-operator"  # not failed, not skipped
    finally:
        await sup.stop()


async def test_a_signer_the_role_cannot_approve_for_blocks_only_its_csrs(
    tmp_path: Path, fake: FakeKube, caplog: pytest.LogCaptureFixture
) -> None:
    """No `approve` on signers/kubernetes.io/kubelet-serving: serving CSRs stay pending with
    the reason, client CSRs (even newer ones) are approved, the rule is reported."""
    caplog.set_level(logging.INFO, logger="appliance.cluster")
    config = least_privilege(fake, tmp_path, without_signer=SERVING_SIGNER)
    fake.add_node("worker-0", ready=True)
    # The oldest: it comes first in every review round.
    serving_csr(fake, "csr-serving-worker-0", "worker-0", dns=["worker-0"], ips=["127.0.0.44"])
    sup = await started(config)
    try:
        svc = cluster(sup)
        state = await forbidden(svc, "csr", "the approver reports the missing rule")
        assert state["missing"]["rule"] == {
            "apiGroups": ["certificates.k8s.io"],
            "resources": ["signers"],
            "verbs": ["approve"],
            "resourceNames": [SERVING_SIGNER],
        }
        assert (
            'not permitted to approve requests with signerName "kubernetes.io/kubelet-serving"'
            in state["detail"]
        )
        for i in range(3):  # client CSRs arriving meanwhile are approved promptly
            client_csr(fake, f"csr-client-{i}", "master-0", by_node=True)
            await until(partial(fake.approved.get, f"csr-client-{i}"), f"client CSR {i}")
        assert conditions(fake, "csr-serving-worker-0") == []
        (row,) = [d for d in store(sup).csr_decisions() if d["csr"] == "csr-serving-worker-0"]
        assert row["decision"] == "pending" and str(row["reason"]).startswith(
            'forbidden: needs approve signers.certificates.k8s.io "kubernetes.io/kubelet-serving"'
        )
        informer = svc.approver.informer
        assert informer is not None and informer.lists == 1  # never restarted for it
        said = [r.getMessage() for r in caplog.records if "cannot conclude" in r.getMessage()]
        assert len(said) == 1, said
        # The operator grants it: the serving CSR is approved at the next round.
        grant(fake, state["missing"]["rule"])
        await until(lambda: fake.approved["csr-serving-worker-0"], "approved once allowed")
        await until(lambda: workers(svc)["csr"]["state"] == "ok", "the approver is ok")
    finally:
        await sup.stop()


async def run(*argv: str, stdin: bytes = b"") -> str:
    """A command's output (it must succeed); async, as the fake API runs in this loop."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode == 0, (argv, err.decode())
    return out.decode()


@pytest.mark.tool("kubectl")
async def test_the_readme_steps_with_kubectl(tmp_path: Path, fake: FakeKube) -> None:
    """`render --as rbac | kubectl apply -f -`, the token kubeconfig built as the README
    says, and the cluster loop approving with it (and with nothing more)."""
    kubectl = need_tool("kubectl")
    admin = str(fake.kubeconfig(tmp_path / "admin.kubeconfig"))
    k = tmp_path / "cluster-loop.kubeconfig"
    config = inventory(tmp_path, k)
    rendered = await run(
        sys.executable, "-m", "appliance", "render", "--config", str(config), "--as", "rbac"
    )
    # --validate=false: the fake serves no OpenAPI schema (the unit tests check the
    # objects against the API's own types instead).
    applied = await run(
        kubectl,
        "--kubeconfig",
        admin,
        "apply",
        "--validate=false",
        "-f",
        "-",
        stdin=rendered.encode(),
    )
    assert "clusterrole.rbac.authorization.k8s.io/appliance-cluster-loop created" in applied
    token = base64.b64decode(
        await run(
            kubectl,
            "--kubeconfig",
            admin,
            "-n",
            "appliance",
            "get",
            "secret",
            "appliance-cluster-loop-token",
            "-o",
            "jsonpath={.data.token}",
        )
    ).decode()
    ca = tmp_path / "api-ca.crt"
    ca.write_bytes(
        base64.b64decode(
            await run(
                kubectl,
                "--kubeconfig",
                admin,
                "config",
                "view",
                "--raw",
                "--minify",
                "-o",
                "jsonpath={.clusters[0].cluster.certificate-authority-data}",
            )
        )
    )
    kc = [kubectl, "--kubeconfig", str(k), "config"]
    await run(
        *kc,
        "set-cluster",
        "cluster",
        f"--server={fake.url}",
        f"--certificate-authority={ca}",
        "--embed-certs",
    )
    # Not `set-credentials`: Debian 12's kubectl 1.20 (built with Go 1.19) panics on it.
    await run(*kc, "set", "users.appliance-cluster-loop.token", token)
    await run(*kc, "set-context", "appliance", "--cluster=cluster", "--user=appliance-cluster-loop")
    await run(*kc, "use-context", "appliance")
    client_csr(fake, "csr-master-0", "master-0")
    sup = await started(config)
    try:
        await until(lambda: fake.approved["csr-master-0"], "approved as the ServiceAccount")
        await until(lambda: fake.get("subscriptions", "nfd", "openshift-nfd"), "NFD subscribed")
        assert fake.refused == []
        user = fake.identities[token][0]
        assert user == "system:serviceaccount:appliance:appliance-cluster-loop"
    finally:
        await sup.stop()


async def test_a_bug_in_one_worker_does_not_stop_the_others(
    tmp_path: Path,
    fake: FakeKube,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="appliance.cluster")

    async def broken(self: Any, kube: Any, plan: Any) -> None:
        raise RuntimeError("a bug in the GPU step")

    monkeypatch.setattr("services.cluster.gpuflow.GpuFlow.step_once", broken)
    config = inventory(tmp_path, fake.kubeconfig(tmp_path / "kubeconfig"))
    sup = await started(config)
    try:
        svc = cluster(sup)
        await until(lambda: workers(svc)["gpu"]["failures"] >= 3, "the GPU worker retried")
        gpu = workers(svc)["gpu"]
        assert gpu["state"] == "backing off"
        assert gpu["detail"] == "internal error: RuntimeError: a bug in the GPU step"
        client_csr(fake, "csr-master-0", "master-0")
        await until(lambda: fake.approved["csr-master-0"], "approved meanwhile")
        assert workers(svc)["csr"] == {**workers(svc)["csr"], "state": "ok", "failures": 0}
        informer = svc.approver.informer
        assert informer is not None and informer.lists == 1
        tracebacks = [r for r in caplog.records if r.exc_info and "gpu worker" in r.getMessage()]
        assert len(tracebacks) == 1  # the traceback once, not once per retry
    finally:
        await sup.stop()


async def test_without_node_read_the_approver_says_it_waits_for_the_node_list(
    tmp_path: Path, fake: FakeKube
) -> None:
    config = least_privilege(fake, tmp_path, without_cluster_rule="nodes")
    sup = await started(config)
    try:
        svc = cluster(sup)
        nodes = await forbidden(svc, "nodes", "nodes forbidden")
        assert nodes["missing"]["rule"]["resources"] == ["nodes"]
        csr = workers(svc)["csr"]
        assert csr["state"] == "waiting" and "the Node list" in csr["detail"], csr
        assert workers(svc)["bootstrap"]["state"] == "ok"
    finally:
        await sup.stop()


async def test_a_revoked_token_is_noticed_and_a_new_kubeconfig_is_read(
    tmp_path: Path, fake: FakeKube
) -> None:
    """The operator rotates the ServiceAccount token and rewrites the kubeconfig in place:
    the refused credentials make the loop read the file again (no reload needed)."""
    config = least_privilege(fake, tmp_path)
    sup = await started(config)
    try:
        svc = cluster(sup)
        await until(lambda: svc.connection["state"] == "connected", "connected")
        for token in [t for t, (user, _) in fake.identities.items() if "serviceaccount" in user]:
            del fake.identities[token]  # revoked
        fake.expire_watches()  # the watches end; the next requests are refused
        await until(lambda: svc.connection["state"] == "unauthorized", "401 noticed")
        assert "401 Unauthorized" in svc.connection["detail"]
        fresh = fake.service_account_token(rbac.NAMESPACE, rbac.NAME)
        fake.kubeconfig(tmp_path / SA_KUBECONFIG, fresh)  # the same path, a new token
        client_csr(fake, "csr-master-0", "master-0")
        await until(lambda: fake.approved["csr-master-0"], "approved with the new token")
        assert svc.connection["state"] == "connected" and svc.connects >= 2
    finally:
        await sup.stop()
