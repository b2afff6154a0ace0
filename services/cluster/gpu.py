"""GPU bring-up (sans-IO): the steps, their state, their manifests and their checks.

On OpenShift through OLM: NFD (Namespace, OperatorGroup, Subscription -> CSV
Succeeded -> a NodeFeatureDiscovery) -> the NVIDIA PCI label on every GPU node ->
the GPU operator (Namespace, OperatorGroup, Subscription -> CSV Succeeded -> a
ClusterPolicy from the CSV's alm-examples -> state ready) -> one nvidia-smi pod per
GPU node, its log parsed and kept, the pod deleted.

GpuState is what the store keeps (key "gpu"): the current step, since when, what it
waits for, and the results, so a restart resumes at the step it was in. Every check
here is a function of API objects and `now`; services.cluster.gpuflow does the I/O.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.plan import OperatorSource

NFD_NAMESPACE = "openshift-nfd"
NFD_PACKAGE = "nfd"
NFD_INSTANCE = "nfd-instance"
GPU_NAMESPACE = "nvidia-gpu-operator"
GPU_PACKAGE = "gpu-operator-certified"
CLUSTER_POLICY = "gpu-cluster-policy"
SMI_POD_PREFIX = "nvidia-smi-"
GPU_RESOURCE = "nvidia.com/gpu"
HOSTNAME_LABEL = "kubernetes.io/hostname"
# NFD's NVIDIA label: vendor 0x10de, alone or qualified by PCI class (0300 VGA, 0302 3D).
GPU_LABELS = tuple(
    f"feature.node.kubernetes.io/pci-{dev}.present" for dev in ("10de", "0302_10de", "0300_10de")
)

STEPS: tuple[str, ...] = (
    "nfd-operator",  # Namespace, OperatorGroup, Subscription for NFD
    "nfd-csv",  # its CSV Succeeded
    "nfd-instance",  # a NodeFeatureDiscovery
    "gpu-labels",  # the PCI label on every GPU node (gpu-discovered)
    "gpu-operator",  # Namespace, OperatorGroup, Subscription for the GPU operator
    "gpu-csv",  # its CSV Succeeded
    "cluster-policy",  # a ClusterPolicy from alm-examples
    "cluster-policy-ready",  # its state ready (gpu-operator-ready)
    "validate",  # nvidia-smi per GPU node (gpu-validated)
    "done",
)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long each step may wait (seconds) before it counts as failed, and the retry."""

    create: float = 600.0
    csv: float = 1800.0
    labels: float = 1800.0
    policy_ready: float = 3600.0
    validate: float = 1800.0
    retry: float = 600.0  # a failed step is tried again after this

    def for_step(self, step: str) -> float:
        return {
            "nfd-csv": self.csv,
            "gpu-csv": self.csv,
            "gpu-labels": self.labels,
            "cluster-policy-ready": self.policy_ready,
            "validate": self.validate,
        }.get(step, self.create)


@dataclass(frozen=True, slots=True)
class Progress:
    """The outcome of looking at a step once: done, or what it still waits for."""

    done: bool
    waiting: str = ""
    error: str = ""  # set: the step cannot succeed as things are (fails at once)


DONE = Progress(True)


@dataclass(frozen=True, slots=True)
class GpuState:
    step: str
    since: float  # when the current step (or its current attempt) began
    waiting: str = ""
    attempts: int = 1
    failed: str = ""  # why the last attempt failed ("" while it runs)
    failed_at: float | None = None
    finished: dict[str, float] = field(default_factory=dict)  # step -> when it completed
    discovered: tuple[str, ...] = ()  # inventory GPU nodes seen with the NFD label
    validated: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> result

    @classmethod
    def new(cls, now: float) -> GpuState:
        return cls(STEPS[0], now)

    @classmethod
    def from_json(cls, data: Any, now: float) -> GpuState:
        """The stored state, or a fresh one when there is none (or it is unreadable)."""
        if not isinstance(data, dict) or data.get("step") not in STEPS:
            return cls.new(now)
        try:
            return cls(
                step=str(data["step"]),
                since=float(data.get("since", now)),
                waiting=str(data.get("waiting", "")),
                attempts=int(data.get("attempts", 1)),
                failed=str(data.get("failed", "")),
                failed_at=None if data.get("failed_at") is None else float(data["failed_at"]),
                finished={str(k): float(v) for k, v in (data.get("finished") or {}).items()},
                discovered=tuple(str(n) for n in data.get("discovered") or ()),
                validated={
                    str(k): dict(v)
                    for k, v in (data.get("validated") or {}).items()
                    if isinstance(v, dict)
                },
            )
        except (TypeError, ValueError, AttributeError):
            return cls.new(now)

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "since": self.since,
            "waiting": self.waiting,
            "attempts": self.attempts,
            "failed": self.failed,
            "failed_at": self.failed_at,
            "finished": dict(self.finished),
            "discovered": list(self.discovered),
            "validated": dict(self.validated),
        }

    @property
    def done(self) -> bool:
        return self.step == "done"

    def advance(self, now: float) -> GpuState:
        """The next step, started now."""
        i = STEPS.index(self.step)
        nxt = STEPS[min(i + 1, len(STEPS) - 1)]
        return replace(
            self,
            step=nxt,
            since=now,
            waiting="",
            attempts=1,
            failed="",
            failed_at=None,
            finished={**self.finished, self.step: now},
        )

    def observe(self, progress: Progress, timeouts: Timeouts, now: float) -> GpuState:
        """Take one look's outcome: advance, keep waiting, or fail (error or time out)."""
        if self.failed:
            return self
        if progress.done:
            return self.advance(now)
        if progress.error:
            return replace(self, waiting=progress.waiting, failed=progress.error, failed_at=now)
        limit = timeouts.for_step(self.step)
        if now - self.since > limit:
            why = f"timed out after {_duration(limit)} waiting for {progress.waiting or self.step}"
            return replace(self, waiting=progress.waiting, failed=why, failed_at=now)
        return replace(self, waiting=progress.waiting)

    def retry_due(self, timeouts: Timeouts, now: float) -> bool:
        return bool(self.failed) and now - (self.failed_at or now) >= timeouts.retry

    def retry(self, now: float) -> GpuState:
        """Start the failed step again; failed validations are redone, good ones kept."""
        kept = {n: r for n, r in self.validated.items() if r.get("ok")}
        return replace(
            self,
            since=now,
            waiting="",
            attempts=self.attempts + 1,
            failed="",
            failed_at=None,
            validated=kept,
        )

    def status_text(self, now: float) -> str:
        """One line for people: "waiting for CSV gpu-operator-certified: Installing for 12 min"."""
        if self.done:
            return f"done: {len(self.validated)} GPU node(s) validated"
        if self.failed:
            return f"{self.step} failed (attempt {self.attempts}): {self.failed}"
        what = self.waiting or self.step
        return f"waiting for {what} for {_duration(now - self.since)}"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{int(seconds)} s" if seconds < 60 else f"{int(seconds // 60)} min"


# --- checks on API objects ---------------------------------------------------------------


def gpu_labelled(labels: Mapping[str, str]) -> bool:
    """NFD found an NVIDIA PCI device on this node."""
    return any(labels.get(key) == "true" for key in GPU_LABELS)


def labels_progress(
    gpu_nodes: Iterable[str], cluster_labels: Mapping[str, Mapping[str, str] | None]
) -> tuple[Progress, tuple[str, ...]]:
    """Which GPU nodes carry the label; `cluster_labels` maps inventory name -> Node labels
    (None while the Node does not exist)."""
    wanted = list(gpu_nodes)
    found = tuple(n for n in wanted if gpu_labelled(cluster_labels.get(n) or {}))
    missing = [n for n in wanted if n not in found]
    if not missing:
        return DONE, found
    absent = [n for n in missing if cluster_labels.get(n) is None]
    text = f"NFD label pci-10de on {', '.join(missing)}"
    if absent:
        text += f" (no Node yet: {', '.join(absent)})"
    return Progress(False, text), found


def installed_csv(subscription: Mapping[str, Any] | None) -> str:
    status = (subscription or {}).get("status") or {}
    return str(status.get("installedCSV") or status.get("currentCSV") or "")


def csv_progress(
    package: str, subscription: Mapping[str, Any] | None, csv: Mapping[str, Any] | None
) -> Progress:
    """Done when the Subscription's CSV reports phase Succeeded."""
    if subscription is None:
        return Progress(False, f"Subscription {package} (it is missing)")
    name = installed_csv(subscription)
    if not name:
        return Progress(False, f"OLM to resolve Subscription {package}")
    if csv is None:
        return Progress(False, f"CSV {package}: {name} not created yet")
    status = csv.get("status") or {}
    phase = str(status.get("phase") or "Pending")
    if phase == "Succeeded":
        return DONE
    reason = str(status.get("reason") or "")
    return Progress(False, f"CSV {package}: {phase}" + (f" ({reason})" if reason else ""))


def alm_example(csv: Mapping[str, Any] | None, kind: str) -> dict[str, Any] | None:
    """The first example of `kind` in the CSV's alm-examples annotation."""
    annotations = ((csv or {}).get("metadata") or {}).get("annotations") or {}
    text = annotations.get("alm-examples")
    if not text:
        return None
    try:
        examples = json.loads(text)
    except ValueError:
        return None
    for example in examples if isinstance(examples, list) else []:
        if isinstance(example, dict) and example.get("kind") == kind:
            return example
    return None


def policy_progress(policy: Mapping[str, Any] | None) -> Progress:
    if policy is None:
        return Progress(False, f"ClusterPolicy {CLUSTER_POLICY} (it is missing)")
    state = str((policy.get("status") or {}).get("state") or "no state yet")
    if state == "ready":
        return DONE
    return Progress(False, f"ClusterPolicy {CLUSTER_POLICY}: {state}")


def pod_phase(pod: Mapping[str, Any] | None) -> str:
    return str(((pod or {}).get("status") or {}).get("phase") or "Pending")


# --- manifests ----------------------------------------------------------------------------


def namespace(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {"openshift.io/cluster-monitoring": "true"}},
    }


def operator_group(ns: str) -> dict[str, Any]:
    return {
        "apiVersion": "operators.coreos.com/v1",
        "kind": "OperatorGroup",
        "metadata": {"name": ns, "namespace": ns},
        "spec": {"targetNamespaces": [ns]},
    }


def subscription(ns: str, package: str, source: OperatorSource) -> dict[str, Any]:
    # No channel: OLM takes the package's default channel of the catalog; no starting
    # CSV: that channel's head.
    spec: dict[str, Any] = {
        "name": package,
        "source": source.catalog_source,
        "sourceNamespace": source.catalog_namespace,
        "installPlanApproval": "Automatic",
    }
    if source.channel is not None:
        spec["channel"] = source.channel
    if source.starting_csv is not None:
        spec["startingCSV"] = source.starting_csv
    return {
        "apiVersion": "operators.coreos.com/v1alpha1",
        "kind": "Subscription",
        "metadata": {"name": package, "namespace": ns},
        "spec": spec,
    }


def nfd_instance(csv: Mapping[str, Any] | None) -> dict[str, Any]:
    """The NFD operator's own example instance (its operand image), else a minimal one."""
    body = alm_example(csv, "NodeFeatureDiscovery") or {
        "apiVersion": "nfd.openshift.io/v1",
        "kind": "NodeFeatureDiscovery",
        "spec": {},
    }
    meta = dict(body.get("metadata") or {})
    meta.update(name=NFD_INSTANCE, namespace=NFD_NAMESPACE)
    return {**body, "metadata": meta}


def merge_patch(base: Any, patch: Any) -> Any:
    """`patch` over `base` as a JSON merge patch (RFC 7386): mappings merge key by key,
    null removes a key, anything else replaces. Neither argument is modified."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(base) if isinstance(base, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def cluster_policy(
    csv: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The ClusterPolicy of the GPU operator's alm-examples with `overrides` (kubernetes.gpu.
    cluster_policy) merged over its spec (None: the CSV has none)."""
    body = alm_example(csv, "ClusterPolicy")
    if body is None:
        return None
    meta = dict(body.get("metadata") or {})
    meta["name"] = CLUSTER_POLICY
    meta.pop("namespace", None)  # cluster-scoped
    spec = copy.deepcopy(body.get("spec") or {})
    if overrides:
        spec = merge_patch(spec, overrides)
    return {**body, "metadata": meta, "spec": spec}


def smi_pod_name(node: str) -> str:
    name = re.sub(r"[^a-z0-9-]", "-", node.lower())
    return (SMI_POD_PREFIX + name)[:63].rstrip("-")


def smi_pod(node: str, hostname: str, image: str, gpus: int = 1) -> dict[str, Any]:
    """One nvidia-smi run on `hostname` with `gpus` GPUs (all of the node's), never restarted."""
    limits = {GPU_RESOURCE: gpus}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": smi_pod_name(node),
            "namespace": GPU_NAMESPACE,
            "labels": {"app.kubernetes.io/name": "nvidia-smi", "appliance/node": node},
        },
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {HOSTNAME_LABEL: hostname},
            "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [
                {
                    "name": "nvidia-smi",
                    "image": image,
                    "command": ["nvidia-smi"],
                    "resources": {"limits": limits, "requests": limits},
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                }
            ],
        },
    }


def count_problem(listed: int, expected: int | None) -> str | None:
    """Why a validation fails on the GPU count (None: it does not; expected None: unchecked)."""
    if expected is None or listed == expected:
        return None
    return (
        f"nvidia-smi lists {listed} GPU{'s' if listed != 1 else ''}, the node has {expected} "
        f"({GPU_RESOURCE} allocatable)"
    )


def summary(result: Mapping[str, Any]) -> str:
    """An event detail for a validated node: "8x Tesla V100-SXM2-16GB, driver 535.1, CUDA 12.2"."""
    models = result.get("models") or {}
    gpus = ", ".join(f"{n}x {m}" for m, n in models.items()) or "no GPU"
    return f"{gpus}, driver {result.get('driver')}, CUDA {result.get('cuda') or 'n/a'}"
