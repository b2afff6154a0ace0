"""The GPU bring-up against the API: one look at the current step at a time.

The steps, their checks and manifests are in services.cluster.gpu (pure); this file
reads and creates the objects. Creating is idempotent (409 = it is there already),
and the state is stored after every change, so a restart (or an API outage) resumes
at the step it was in without redoing the steps before it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from appliance.plan import OperatorSource, Plan
from services.cluster import gpu
from services.cluster.gpu import DONE, GpuState, Progress, Timeouts
from services.cluster.kube import (
    CLUSTER_POLICIES,
    CSVS,
    NAMESPACES,
    NFDS,
    OPERATOR_GROUPS,
    PODS,
    SUBSCRIPTIONS,
    Forbidden,
    Kube,
    KubeError,
)
from services.cluster.nodes import ClusterView, node_fields
from services.cluster.smi import SmiError, parse_nvidia_smi

if TYPE_CHECKING:
    from appliance.service import ServiceContext

STORE_KEY = "gpu"
LOG_TAIL = 2000  # characters of a failed pod's log kept with its result


def gpu_nodes(plan: Plan) -> list[str]:
    return [n.name for n in plan.nodes if n.gpu and n.role != "bootstrap"]


def _requested(pod: Mapping[str, Any]) -> int | None:
    """The GPUs a validation pod asked for (its first container's limit)."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        limits = (container.get("resources") or {}).get("limits") or {}
        value = limits.get(gpu.GPU_RESOURCE)
        if isinstance(value, int | str) and str(value).isdigit():
            return int(value)
    return None


def wanted(plan: Plan) -> bool:
    return plan.kubernetes.gpu_operator and bool(gpu_nodes(plan))


class GpuFlow:
    def __init__(
        self,
        ctx: ServiceContext,
        plan: Callable[[], Plan],
        view: ClusterView,
        timeouts: Timeouts,
        poll: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ctx = ctx
        self.plan = plan
        self.view = view
        self.timeouts = timeouts
        self.poll = poll
        self.clock = clock
        self.log = logging.getLogger("appliance.cluster.gpu")
        self.state = GpuState.from_json(ctx.store.cluster_state(STORE_KEY), clock())
        self.created: list[str] = []  # objects this process created (kind/name), in order
        self.expected: dict[str, int | None] = {}  # GPUs each validation pod asked for

    def status(self) -> dict[str, Any]:
        plan = self.plan()
        if not wanted(plan):
            why = (
                "kubernetes.gpu_operator is off"
                if not plan.kubernetes.gpu_operator
                else ("no inventory node has gpu: true")
            )
            return {"step": None, "status": f"off: {why}"}
        return {
            "step": self.state.step,
            "status": self.state.status_text(self.clock()),
            "attempts": self.state.attempts,
            "failed": self.state.failed or None,
            "finished": dict(self.state.finished),
            "discovered": list(self.state.discovered),
            "validated": dict(self.state.validated),
        }

    def _save(self, state: GpuState) -> None:
        if state != self.state:
            if state.step != self.state.step:
                self.log.info("GPU bring-up: %s done, next: %s", self.state.step, state.step)
            elif state.failed and not self.state.failed:
                self.log.warning("GPU bring-up: %s failed: %s", state.step, state.failed)
            self.state = state
            self.ctx.store.set_cluster_state(STORE_KEY, state.to_json(), self.clock())

    async def run(self, kube: Kube) -> None:
        while True:
            plan = self.plan()
            if not wanted(plan):
                await asyncio.sleep(self.poll)
                continue
            before = (self.state.step, self.state.attempts)
            await self.step_once(kube, plan)
            if (self.state.step, self.state.attempts) == before or self.state.done:
                await asyncio.sleep(self.poll)  # at most len(STEPS) looks in a row without it

    async def step_once(self, kube: Kube, plan: Plan) -> None:
        """Look at the current step once and move the state on."""
        now = self.clock()
        state = self.state
        if state.done:
            missing = [n for n in gpu_nodes(plan) if not state.validated.get(n, {}).get("ok")]
            if not missing:
                return
            # A GPU node was added to the inventory: discover and validate it too.
            self.log.info("GPU bring-up: new GPU node(s) %s", ", ".join(missing))
            state = replace(state, step="gpu-labels", since=now, waiting="", attempts=1)
            self._save(state)
        if state.failed:
            if not state.retry_due(self.timeouts, now):
                return
            self._save(state.retry(now))
        try:
            progress = await self._look(kube, plan)
        except Forbidden:
            raise  # not a wait: the identity lacks a rule; the worker backs off and says which
        except KubeError as exc:
            # The server refused something (403, 404 for a kind not installed yet, 422):
            # keep waiting within the step's time bound; the text says what happened.
            progress = Progress(False, f"{self.state.step}: API said {exc}")
        self._save(self.state.observe(progress, self.timeouts, self.clock()))

    async def _look(self, kube: Kube, plan: Plan) -> Progress:
        step = self.state.step
        if step == "nfd-operator":
            return await self._subscribe(
                kube, gpu.NFD_NAMESPACE, gpu.NFD_PACKAGE, plan.kubernetes.gpu.nfd
            )
        if step == "nfd-csv":
            return await self._csv(kube, gpu.NFD_NAMESPACE, gpu.NFD_PACKAGE)
        if step == "nfd-instance":
            csv = await self._installed_csv(kube, gpu.NFD_NAMESPACE, gpu.NFD_PACKAGE)
            await self._create(kube, NFDS, gpu.nfd_instance(csv), gpu.NFD_NAMESPACE)
            return DONE
        if step == "gpu-labels":
            return self._labels(plan)
        if step == "gpu-operator":
            return await self._subscribe(
                kube, gpu.GPU_NAMESPACE, gpu.GPU_PACKAGE, plan.kubernetes.gpu.operator
            )
        if step == "gpu-csv":
            return await self._csv(kube, gpu.GPU_NAMESPACE, gpu.GPU_PACKAGE)
        if step == "cluster-policy":
            csv = await self._installed_csv(kube, gpu.GPU_NAMESPACE, gpu.GPU_PACKAGE)
            body = gpu.cluster_policy(csv, plan.kubernetes.gpu.cluster_policy)
            if body is None:
                name = gpu.installed_csv(
                    await kube.get(SUBSCRIPTIONS, gpu.GPU_PACKAGE, gpu.GPU_NAMESPACE)
                )
                return Progress(
                    False,
                    "a ClusterPolicy example",
                    f"CSV {name} has no ClusterPolicy in alm-examples",
                )
            await self._create(kube, CLUSTER_POLICIES, body)
            return DONE
        if step == "cluster-policy-ready":
            progress = gpu.policy_progress(await kube.get(CLUSTER_POLICIES, gpu.CLUSTER_POLICY))
            if progress.done:
                for node in gpu_nodes(plan):
                    self._publish(
                        node, "gpu-operator-ready", f"ClusterPolicy {gpu.CLUSTER_POLICY} ready"
                    )
            return progress
        if step == "validate":
            return await self._validate(kube, plan)
        return DONE

    # --- steps ---------------------------------------------------------------------------

    async def _create(
        self, kube: Kube, res: Any, body: dict[str, Any], namespace: str | None = None
    ) -> None:
        name = body["metadata"]["name"]
        if await kube.create(res, body, namespace):
            self.created.append(f"{body.get('kind')}/{name}")
            self.log.info("created %s %s", body.get("kind"), name)

    async def _subscribe(
        self, kube: Kube, ns: str, package: str, source: OperatorSource
    ) -> Progress:
        # Looked up first: with the least-privilege role the namespace was created with
        # the role (`render --as rbac`) and the loop may read it but not create namespaces.
        if await kube.get(NAMESPACES, ns) is None:
            await self._create(kube, NAMESPACES, gpu.namespace(ns))
        await self._create(kube, OPERATOR_GROUPS, gpu.operator_group(ns), ns)
        await self._create(kube, SUBSCRIPTIONS, gpu.subscription(ns, package, source), ns)
        return DONE

    async def _installed_csv(self, kube: Kube, ns: str, package: str) -> dict[str, Any] | None:
        name = gpu.installed_csv(await kube.get(SUBSCRIPTIONS, package, ns))
        return await kube.get(CSVS, name, ns) if name else None

    async def _csv(self, kube: Kube, ns: str, package: str) -> Progress:
        sub = await kube.get(SUBSCRIPTIONS, package, ns)
        name = gpu.installed_csv(sub)
        csv = await kube.get(CSVS, name, ns) if name else None
        return gpu.csv_progress(package, sub, csv)

    def _labels(self, plan: Plan) -> Progress:
        nodes = gpu_nodes(plan)
        labels = {}
        for node in nodes:
            seen = self.view.for_inventory(plan, node)
            labels[node] = dict(seen.labels) if seen is not None else None
        progress, found = gpu.labels_progress(nodes, labels)
        fresh = [n for n in found if n not in self.state.discovered]
        for node in fresh:
            self._publish(node, "gpu-discovered", "NFD: NVIDIA PCI device (pci-10de) present")
        if fresh:
            self._save(replace(self.state, discovered=(*self.state.discovered, *fresh)))
        return progress

    async def _validate(self, kube: Kube, plan: Plan) -> Progress:
        image = plan.kubernetes.validation_image
        all_gpus = plan.kubernetes.gpu.validate_all_gpus
        waiting: list[str] = []
        for node in gpu_nodes(plan):
            if node in self.state.validated:
                continue
            seen = self.view.for_inventory(plan, node)
            if seen is None:
                waiting.append(f"Node {node}")
                continue
            name = gpu.smi_pod_name(node)
            # All of the node's GPUs, as its device plugin advertises them (validate_all_gpus);
            # the count asked for is kept so a restart checks against the same number.
            expected = self.expected.get(node)
            pod = await kube.get(PODS, name, gpu.GPU_NAMESPACE)
            if pod is None:
                if not all_gpus:
                    expected = None
                elif not seen.gpus:
                    waiting.append(f"Node {node}: no {gpu.GPU_RESOURCE} allocatable yet")
                    continue
                else:
                    expected = seen.gpus
                pod_body = gpu.smi_pod(node, seen.hostname, image, expected or 1)
                await self._create(kube, PODS, pod_body, gpu.GPU_NAMESPACE)
                self.expected[node] = expected
                waiting.append(f"pod {name}: created")
                continue
            if all_gpus and expected is None:
                expected = _requested(pod)  # a pod created before a restart
            phase = gpu.pod_phase(pod)
            if phase not in ("Succeeded", "Failed"):
                waiting.append(f"pod {name}: {phase}")
                continue
            log = await kube.pod_log(name, gpu.GPU_NAMESPACE)
            result = self._result(node, name, phase, log, expected)
            self.expected.pop(node, None)
            await kube.delete(PODS, name, gpu.GPU_NAMESPACE)  # its log is read and kept
            self._save(replace(self.state, validated={**self.state.validated, node: result}))
            if result["ok"]:
                self._publish(node, "gpu-validated", gpu.summary(result))
                where = node_fields(self.plan(), node)
                self.log.info("%s validated: %s", node, gpu.summary(result), extra=where)
            else:
                where = node_fields(self.plan(), node)
                self.log.warning("%s: nvidia-smi failed: %s", node, result["error"], extra=where)
        if waiting:
            return Progress(False, "; ".join(waiting))
        failed = {n: r for n, r in self.state.validated.items() if not r.get("ok")}
        if failed:
            why = "; ".join(f"{n}: {r.get('error')}" for n, r in failed.items())
            return Progress(False, "nvidia-smi", f"nvidia-smi failed on {why}")
        return DONE

    def _result(
        self, node: str, pod: str, phase: str, log: str, expected: int | None
    ) -> dict[str, Any]:
        now = self.clock()
        try:
            report = parse_nvidia_smi(log)
        except SmiError as exc:
            error = str(exc) if phase == "Succeeded" else f"pod {phase}: {exc}"
            return {"ok": False, "error": error, "pod": pod, "time": now, "log": log[-LOG_TAIL:]}
        if phase != "Succeeded":
            return {
                "ok": False,
                "error": f"pod {phase}",
                "pod": pod,
                "time": now,
                "log": log[-LOG_TAIL:],
            }
        problem = gpu.count_problem(report.count, expected)
        if problem is not None:
            return {
                "ok": False,
                "error": problem,
                "pod": pod,
                "time": now,
                "expected": expected,
                "count": report.count,
                "log": log[-LOG_TAIL:],
            }
        return {"ok": True, "pod": pod, "time": now, "expected": expected, **report.to_dict()}

    def _publish(self, node: str, stage: str, detail: str) -> None:
        self.ctx.bus.publish(node, stage, detail, source="cluster", time=self.clock())
