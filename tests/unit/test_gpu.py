"""GPU bring-up logic without an API: nvidia-smi parsing, step checks, state and manifests."""

from __future__ import annotations

import json
from typing import Any

import pytest

from appliance.inventory import InventoryError, parse_inventory
from appliance.plan import GpuPlan, build_plan
from services.cluster import gpu
from services.cluster.gpu import DONE, STEPS, GpuState, Progress, Timeouts
from services.cluster.nodes import NodeSeen
from services.cluster.smi import SmiError, parse_nvidia_smi
from tests.helpers import CONFIG, dgxpod_data

# What `oc logs nvidia-smi` printed on a DGX-1 in the article's time (driver 418 layout).
V100_LOG = """\
Tue May 14 09:04:41 2019
+-----------------------------------------------------------------------------+
| NVIDIA-SMI 418.40.04    Driver Version: 418.40.04    CUDA Version: 10.1     |
|-------------------------------+----------------------+----------------------+
| GPU  Name        Persistence-M| Bus-Id        Disp.A | Volatile Uncorr. ECC |
| Fan  Temp  Perf  Pwr:Usage/Cap|         Memory-Usage | GPU-Util  Compute M. |
|===============================+======================+======================|
|   0  Tesla V100-SXM2...  On   | 00000000:06:00.0 Off |                    0 |
| N/A   34C    P0    41W / 300W |      0MiB / 16130MiB |      0%      Default |
+-------------------------------+----------------------+----------------------+
|   1  Tesla V100-SXM2...  On   | 00000000:07:00.0 Off |                    0 |
| N/A   36C    P0    42W / 300W |      0MiB / 16130MiB |      0%      Default |
+-------------------------------+----------------------+----------------------+

+-----------------------------------------------------------------------------+
| Processes:                                                       GPU Memory |
|  GPU       PID   Type   Process name                             Usage      |
|=============================================================================|
|  No running processes found                                                 |
+-----------------------------------------------------------------------------+
"""

# The 535 layout (wider name column, "NVIDIA" names, MIG column).
A100_LOG = """\
Wed Mar  6 12:00:00 2024
+---------------------------------------------------------------------------------------+
| NVIDIA-SMI 535.104.05             Driver Version: 535.104.05   CUDA Version: 12.2     |
|-----------------------------------------+----------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id        Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |         Memory-Usage | GPU-Util  Compute M. |
|                                         |                      |               MIG M. |
|=========================================+======================+======================|
|   0  NVIDIA A100-SXM4-80GB          On  | 00000000:07:00.0 Off |                    0 |
| N/A   30C    P0              61W / 400W |      4MiB / 81920MiB |      0%      Default |
|                                         |                      |             Disabled |
+-----------------------------------------+----------------------+----------------------+

+---------------------------------------------------------------------------------------+
| Processes:                                                                            |
|  GPU   GI   CI        PID   Type   Process name                            GPU Memory |
|        ID   ID                                                             Usage      |
|=======================================================================================|
|    0   N/A  N/A     12345      C   python                                      4MiB |
+---------------------------------------------------------------------------------------+
"""


def test_parse_v100_table() -> None:
    r = parse_nvidia_smi(V100_LOG)
    assert (r.driver, r.cuda, r.smi_version, r.count) == ("418.40.04", "10.1", "418.40.04", 2)
    assert r.models == {"Tesla V100-SXM2...": 2}
    assert [g.bus_id for g in r.gpus] == ["00000000:06:00.0", "00000000:07:00.0"]
    assert r.gpus[0].memory_mib == 16130
    d = r.to_dict()
    assert d["count"] == 2 and d["gpus"][1]["index"] == 1
    assert gpu.summary(d) == "2x Tesla V100-SXM2..., driver 418.40.04, CUDA 10.1"


def test_parse_a100_table_ignores_the_process_list() -> None:
    r = parse_nvidia_smi(A100_LOG)
    assert (r.driver, r.cuda, r.count) == ("535.104.05", "12.2", 1)
    assert r.gpus[0].name == "NVIDIA A100-SXM4-80GB" and r.gpus[0].memory_mib == 81920


@pytest.mark.parametrize(
    ("log", "words"),
    [
        (
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.",
            "couldn't communicate",
        ),
        ("No devices were found\n", "No devices were found"),
        ("", "the log is empty"),
        ("exec: nvidia-smi: executable file not found in $PATH", "executable file not found"),
        ("hello\n", "starts with 'hello'"),
        (V100_LOG.split("|=====")[0], "listed no GPU"),
    ],
)
def test_parse_failures_say_what_was_printed(log: str, words: str) -> None:
    with pytest.raises(SmiError, match=words):
        parse_nvidia_smi(log)


# --- checks on API objects ------------------------------------------------------------------


def test_gpu_label_forms() -> None:
    base = "feature.node.kubernetes.io/"
    assert gpu.gpu_labelled({base + "pci-10de.present": "true"})
    assert gpu.gpu_labelled({base + "pci-0302_10de.present": "true"})
    assert gpu.gpu_labelled({base + "pci-0300_10de.present": "true"})
    assert not gpu.gpu_labelled({base + "pci-10de.present": "false"})
    assert not gpu.gpu_labelled({base + "pci-8086.present": "true"})


def test_labels_progress_names_what_is_missing() -> None:
    label = {gpu.GPU_LABELS[0]: "true"}
    progress, found = gpu.labels_progress(["w0", "w1"], {"w0": label, "w1": None})
    assert not progress.done and found == ("w0",)
    assert progress.waiting == "NFD label pci-10de on w1 (no Node yet: w1)"
    progress, found = gpu.labels_progress(["w0", "w1"], {"w0": label, "w1": label})
    assert progress.done and found == ("w0", "w1")


def test_csv_progress() -> None:
    sub = {"status": {"installedCSV": "gpu-operator-certified.v24.3.0"}}
    assert gpu.csv_progress("p", None, None).waiting == "Subscription p (it is missing)"
    assert gpu.csv_progress("p", {"status": {}}, None).waiting == "OLM to resolve Subscription p"
    assert "not created yet" in gpu.csv_progress("p", sub, None).waiting
    csv = {"status": {"phase": "Installing", "reason": "InstallWaiting"}}
    assert gpu.csv_progress("p", sub, csv).waiting == "CSV p: Installing (InstallWaiting)"
    assert gpu.csv_progress("p", sub, {"status": {"phase": "Succeeded"}}) is DONE


def test_cluster_policy_from_alm_examples() -> None:
    example = {"apiVersion": "nvidia.com/v1", "kind": "ClusterPolicy", "metadata": {"name": "x"}}
    csv = {"metadata": {"annotations": {"alm-examples": json.dumps([{"kind": "Other"}, example])}}}
    body = gpu.cluster_policy(csv)
    assert body is not None and body["metadata"]["name"] == gpu.CLUSTER_POLICY
    assert body["apiVersion"] == "nvidia.com/v1"
    assert gpu.cluster_policy({"metadata": {"annotations": {"alm-examples": "not json"}}}) is None
    assert gpu.cluster_policy(None) is None
    nfd = gpu.nfd_instance(None)
    assert nfd["metadata"] == {"name": gpu.NFD_INSTANCE, "namespace": gpu.NFD_NAMESPACE}


def test_policy_progress() -> None:
    assert gpu.policy_progress(None).waiting.endswith("(it is missing)")
    assert gpu.policy_progress({"status": {"state": "notReady"}}).waiting.endswith("notReady")
    assert gpu.policy_progress({"status": {"state": "ready"}}).done


def test_smi_pod_is_pinned_and_asks_for_one_gpu() -> None:
    pod = gpu.smi_pod("worker-0", "worker-0.dgxpod.nvidia.com", "nvcr.io/nvidia/cuda:x")
    spec = pod["spec"]
    assert pod["metadata"]["name"] == "nvidia-smi-worker-0"
    assert spec["restartPolicy"] == "Never"
    assert spec["nodeSelector"] == {"kubernetes.io/hostname": "worker-0.dgxpod.nvidia.com"}
    (container,) = spec["containers"]
    assert container["command"] == ["nvidia-smi"]
    assert container["resources"] == {
        "limits": {"nvidia.com/gpu": 1},
        "requests": {"nvidia.com/gpu": 1},
    }


# --- the state machine -----------------------------------------------------------------------


def test_steps_advance_in_order_and_remember_when() -> None:
    state = GpuState.new(0.0)
    t = Timeouts()
    for i, step in enumerate(STEPS[:-1]):
        assert state.step == step
        state = state.observe(DONE, t, float(i + 1))
        assert state.finished[step] == float(i + 1)
    assert state.done and state.status_text(100.0).startswith("done")


def test_status_text_and_timeout() -> None:
    t = Timeouts(csv=1800.0)
    state = GpuState("gpu-csv", since=1000.0)
    waiting = Progress(False, "CSV gpu-operator-certified: Installing")
    state = state.observe(waiting, t, 1000.0 + 12 * 60 + 5)
    assert state.status_text(1000.0 + 12 * 60 + 5) == (
        "waiting for CSV gpu-operator-certified: Installing for 12 min"
    )
    assert state.status_text(1030.0).endswith("for 30 s")
    timed_out = state.observe(waiting, t, 1000.0 + 1801)
    assert timed_out.failed.startswith("timed out after 30 min waiting for CSV")
    assert timed_out.status_text(4000.0).startswith("gpu-csv failed (attempt 1)")
    # A failed step is left alone until its retry is due, then starts afresh.
    assert timed_out.observe(DONE, t, 5000.0) == timed_out
    assert not timed_out.retry_due(t, 1000.0 + 1801 + 599)
    assert timed_out.retry_due(t, 1000.0 + 1801 + 600)
    again = timed_out.retry(9000.0)
    assert (again.step, again.attempts, again.since, again.failed) == ("gpu-csv", 2, 9000.0, "")


def test_an_error_fails_the_step_at_once() -> None:
    state = GpuState("cluster-policy", since=0.0).observe(
        Progress(False, "a ClusterPolicy example", "CSV x has no ClusterPolicy"), Timeouts(), 1.0
    )
    assert state.failed == "CSV x has no ClusterPolicy" and state.failed_at == 1.0


def test_retry_keeps_good_validations_only() -> None:
    state = GpuState(
        "validate",
        since=0.0,
        failed="nvidia-smi failed on w1",
        failed_at=1.0,
        validated={"w0": {"ok": True}, "w1": {"ok": False, "error": "x"}},
    )
    assert state.retry(700.0).validated == {"w0": {"ok": True}}


def test_state_survives_json_and_rejects_garbage() -> None:
    state = GpuState(
        "validate",
        since=5.0,
        waiting="pod nvidia-smi-w0: Pending",
        attempts=2,
        finished={"nfd-operator": 1.0},
        discovered=("w0",),
        validated={"w0": {"ok": True, "count": 8}},
    )
    data = json.loads(json.dumps(state.to_json()))
    assert GpuState.from_json(data, 99.0) == state
    assert GpuState.from_json(None, 99.0) == GpuState.new(99.0)
    assert GpuState.from_json({"step": "no-such-step"}, 99.0).step == STEPS[0]
    assert GpuState.from_json({"step": "validate", "since": "x"}, 99.0) == GpuState.new(99.0)


# --- kubernetes.gpu: where the operators come from, the ClusterPolicy, all GPUs ---------------


def _gpu_plan(gpu_key: dict[str, object] | None) -> GpuPlan:
    raw = dgxpod_data()
    if gpu_key is not None:
        raw.setdefault("kubernetes", {})["gpu"] = gpu_key
    return build_plan(parse_inventory(raw, "test.yaml", CONFIG)).kubernetes.gpu


def test_gpu_defaults_are_todays_subscriptions() -> None:
    plan = _gpu_plan(None)
    assert plan.validate_all_gpus and dict(plan.cluster_policy) == {}
    nfd = gpu.subscription(gpu.NFD_NAMESPACE, gpu.NFD_PACKAGE, plan.nfd)
    op = gpu.subscription(gpu.GPU_NAMESPACE, gpu.GPU_PACKAGE, plan.operator)
    for sub, catalog in ((nfd, "redhat-operators"), (op, "certified-operators")):
        # No channel, no starting CSV: OLM takes the catalog's default channel, its head.
        assert sub["spec"] == {
            "name": sub["metadata"]["name"],
            "source": catalog,
            "sourceNamespace": "openshift-marketplace",
            "installPlanApproval": "Automatic",
        }


def test_gpu_subscriptions_follow_the_inventory() -> None:
    plan = _gpu_plan(
        {
            "nfd": {"channel": "stable", "catalog_source": "my-mirror"},
            "operator": {
                "catalog_source": "certified-mirror",
                "catalog_namespace": "mirrors",
                "channel": "v24.3",
                "starting_csv": "gpu-operator-certified.v24.3.0",
            },
        }
    )
    nfd = gpu.subscription(gpu.NFD_NAMESPACE, gpu.NFD_PACKAGE, plan.nfd)["spec"]
    assert (nfd["source"], nfd["sourceNamespace"], nfd["channel"]) == (
        "my-mirror",
        "openshift-marketplace",
        "stable",
    )
    assert "startingCSV" not in nfd
    op = gpu.subscription(gpu.GPU_NAMESPACE, gpu.GPU_PACKAGE, plan.operator)["spec"]
    assert op["source"] == "certified-mirror" and op["sourceNamespace"] == "mirrors"
    assert op["channel"] == "v24.3" and op["startingCSV"] == "gpu-operator-certified.v24.3.0"


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ({"operator": {"channel": ""}}, "channel"),
        ({"operator": {"catalog_namespace": "Not A Namespace"}}, "catalog_namespace"),
        ({"nfd": {"starting_csv": "nfd v4"}}, "starting_csv"),
        ({"operator": {"chanel": "stable"}}, "chanel"),
        ({"validate_all_gpus": "perhaps"}, "validate_all_gpus"),
        ({"cluster_policy": ["driver"]}, "cluster_policy"),
    ],
)
def test_gpu_key_mistakes_are_refused(key: dict[str, object], words: str) -> None:
    with pytest.raises(InventoryError, match=words):
        _gpu_plan(key)


POLICY: dict[str, Any] = {
    "apiVersion": "nvidia.com/v1",
    "kind": "ClusterPolicy",
    "metadata": {"name": "gpu-cluster-policy"},
    "spec": {
        "driver": {"enabled": True, "version": "550.54.15", "rdma": {"enabled": False}},
        "mig": {"strategy": "single"},
        "toolkit": {"enabled": True},
        "dcgm": {"enabled": True},
        "devicePlugin": {"config": {"name": "", "default": ""}},
    },
}


def _csv_with(example: dict[str, object]) -> dict[str, object]:
    return {"metadata": {"annotations": {"alm-examples": json.dumps([example])}}}


def test_cluster_policy_overrides_are_merged_over_the_example() -> None:
    overrides = {
        "driver": {"version": "535.161.08", "rdma": {"enabled": True}},
        "mig": {"strategy": "mixed"},
        "dcgm": None,  # null removes, as in a JSON merge patch
        "validator": {"plugin": {"env": [{"name": "WITH_WORKLOAD", "value": "false"}]}},
    }
    body = gpu.cluster_policy(_csv_with(POLICY), overrides)
    assert body is not None
    spec = body["spec"]
    assert spec["driver"] == {"enabled": True, "version": "535.161.08", "rdma": {"enabled": True}}
    assert spec["mig"] == {"strategy": "mixed"}
    assert spec["toolkit"] == {"enabled": True}  # untouched keys stay
    assert "dcgm" not in spec
    assert spec["validator"]["plugin"]["env"][0]["name"] == "WITH_WORKLOAD"
    assert POLICY["spec"]["mig"] == {"strategy": "single"}  # the example is not modified
    assert gpu.cluster_policy(_csv_with(POLICY), {}) == gpu.cluster_policy(_csv_with(POLICY))


def test_smi_pod_asks_for_every_gpu_of_the_node() -> None:
    pod = gpu.smi_pod("worker-0", "worker-0", "img", gpus=8)
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert container["resources"]["requests"] == {"nvidia.com/gpu": 8}


@pytest.mark.parametrize(
    ("allocatable", "count"),
    [
        ({"nvidia.com/gpu": "8"}, 8),
        ({"cpu": "64"}, None),
        ({"nvidia.com/gpu": "x"}, None),
        (None, None),
    ],
)
def test_node_gpu_allocatable(allocatable: object, count: int | None) -> None:
    obj = {"metadata": {"name": "w"}, "status": {"allocatable": allocatable}}
    seen = NodeSeen.from_object(obj)
    assert seen is not None and seen.gpus == count


def test_every_gpu_must_be_listed() -> None:
    report = parse_nvidia_smi(V100_LOG)  # two GPUs
    assert gpu.count_problem(report.count, 2) is None
    assert gpu.count_problem(report.count, None) is None  # not asked to check
    assert gpu.count_problem(report.count, 8) == (
        "nvidia-smi lists 2 GPUs, the node has 8 (nvidia.com/gpu allocatable)"
    )
