"""The dashboard in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

The page is loaded from `appliance run` (tests/integration/admin_env.py); then real
traffic moves a node (curl from master-0's address fetches the kernel, the
initramfs and its ignition; scapy does worker-0's DHCP exchange) and the test waits
for those stages to turn "done" on the page without reloading it: they arrive over
the events stream. A screenshot goes to docs/dashboard.png.
"""

from __future__ import annotations

import base64
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.store import Store
from tests.helpers import ROOT
from tests.integration.admin_env import (
    BOOTSTRAP,
    MACS,
    MASTER,
    AdminEnv,
    dhcp_exchange,
    discover_unknown,
    start,
)

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = ROOT / "docs" / "dashboard.png"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminEnv]:
    e = start(tmp_path_factory.mktemp("dashboard"))
    yield e
    e.close()


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run must install it")
        pytest.skip("Debian's chromium is not installed (/usr/bin/chromium)")
    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp_path))
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            args=ARGS,
            headless=True,
            viewport={"width": 1440, "height": 1200},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()
    shutil.rmtree(profile, ignore_errors=True)


def _step(page: Any, node: str, stage: str) -> Any:
    return page.locator(f'#node-{node} .step[data-stage="{stage}"]')


def test_dashboard_shows_stages_arriving_live(env: AdminEnv, page: Any) -> None:
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(env.admin + "/", wait_until="domcontentloaded", timeout=20_000)
    page.wait_for_selector("#node-master-0 .step", timeout=15_000)
    page.wait_for_selector("#live.on", timeout=15_000)  # the events stream is open
    kernel = _step(page, "master-0", "kernel")
    assert kernel.get_attribute("data-state") in ("pending", "next")
    assert page.locator("#node-master-0 .step").count() == 10  # install + join stages
    assert page.locator("#node-worker-0 .step").count() == 13  # and the GPU stages

    # Real traffic; the page is not reloaded.
    dhcp_exchange(env, MACS["worker-0"])
    assert env.fetch("/images/rhcos/installer-kernel", MASTER) == 200
    assert env.fetch("/images/rhcos/installer-initramfs.img", MASTER) == 200
    page.wait_for_selector(
        '#node-master-0 .step[data-stage="initramfs"][data-state="done"]', timeout=15_000
    )
    assert kernel.get_attribute("data-state") == "done"
    assert _step(page, "master-0", "ignition").get_attribute("data-state") == "next"
    waiting = page.locator('#node-master-0 [data-role="waiting"]').inner_text()
    assert waiting.startswith("waiting for ignition")
    page.wait_for_selector('#node-worker-0 .step[data-stage="dhcp-ack"][data-state="done"]')
    assert page.locator("#events li").count() >= 4
    assert "initramfs" in page.locator("#events li").first.inner_text()

    # What the cluster loop records (written by a second store connection, as it does);
    # the next event refreshes the side panels.
    now = time.time()
    with Store.open(env.base / "state") as store:
        store.record_csr_decision(
            time=now, csr="csr-7xk2p", kind="client", decision="approve", node="master-0",
            requestor="system:serviceaccount:openshift-machine-config-operator:node-bootstrapper",
            reason="client CSR of inventory node master-0",
        )  # fmt: skip
        store.record_csr_decision(
            time=now, csr="csr-q9w4d", kind="other", decision="deny", node="",
            requestor="system:anonymous", reason="CN system:node:rogue is not an inventory node",
        )  # fmt: skip
        store.set_cluster_state(
            "gpu",
            {"step": "operator", "since": now - 300, "waiting": "CSV gpu-operator-certified",
             "attempts": 1, "failed": None, "discovered": ["worker-0"], "validated": {}},
            now,
        )  # fmt: skip

    # The ignition fetch: master-0's next boot turns to the local disk.
    assert env.fetch("/ignition/master.ign", MASTER) == 200
    page.wait_for_selector(
        '#node-master-0 .step[data-stage="ignition"][data-state="done"]', timeout=15_000
    )
    assert "next boot: local disk" in page.locator("#node-master-0").inner_text()
    assert page.locator("#c-installed").inner_text() == "1 / 3"

    # Side panels: backend health, the lease, the live indicator.
    page.wait_for_function(
        "document.querySelector('#backends') && "
        "document.querySelector('#backends').innerText.includes('up')",
        timeout=15_000,
    )
    assert "worker-0" in page.locator("#backends").inner_text()
    page.wait_for_function(
        "document.querySelector('#leases').innerText.includes('127.0.0.44')", timeout=15_000
    )
    page.wait_for_function(
        "document.querySelector('#csr').innerText.includes('approve')",
        timeout=15_000,
    )
    csr = page.locator("#csr").inner_text()
    assert "approve" in csr and "deny" in csr and "master-0" in csr
    assert page.locator("#c-csr").inner_text() == "2"
    assert "worker-0" in page.locator("#gpu").inner_text()
    assert page.locator("#live-text").inner_text() == "live"
    assert not errors, errors

    page.wait_for_timeout(1600)  # let the highlight of the last change fade
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 20_000


def test_dashboard_shows_a_boot_error_red_until_the_node_gets_past_it(
    env: AdminEnv, page: Any
) -> None:
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto(env.admin + "/", wait_until="domcontentloaded", timeout=20_000)
    page.wait_for_selector("#live.on", timeout=15_000)
    assert page.locator("#node-bootstrap[data-boot-error]").count() == 0

    # The bootstrap machine asks for a kernel that is not there (a 404 from its address).
    kernel = env.base / "images" / "rhcos" / "installer-kernel"
    aside = kernel.with_name("kernel-aside")
    kernel.rename(aside)
    try:
        assert env.fetch("/images/rhcos/installer-kernel", BOOTSTRAP) == 404
        page.wait_for_selector(
            '#node-bootstrap .step[data-stage="kernel"][data-state="error"]', timeout=15_000
        )
    finally:
        aside.rename(kernel)
    row = page.locator("#node-bootstrap")
    assert row.get_attribute("data-boot-error") == "1"
    message = page.locator('#node-bootstrap [data-role="boot-error"]').inner_text()
    assert "/images/rhcos/installer-kernel" in message and "missing" in message
    color = page.eval_on_selector(
        '#node-bootstrap .step[data-stage="kernel"] .pin',
        "e => getComputedStyle(e).backgroundColor",
    )
    assert color == "rgb(229, 83, 75)"  # --bad: red
    assert "boot error" in page.locator("#events li").first.inner_text()

    # An unknown machine one digit off the bootstrap's MAC: the panel suggests it.
    discover_unknown(env, "52:54:00:00:10:53")
    page.wait_for_function(
        "document.querySelector('#unknown').innerText.includes('52:54:00:00:10:53')",
        timeout=15_000,
    )
    assert (
        "did you mean nodes[0] bootstrap 52:54:00:00:00:53?"
        in page.locator("#unknown").inner_text()
    )

    # The kernel is back and fetched: the next progress clears the red state.
    assert env.fetch("/images/rhcos/installer-kernel", BOOTSTRAP) == 200
    page.wait_for_selector(
        '#node-bootstrap .step[data-stage="kernel"][data-state="done"]', timeout=15_000
    )
    assert row.get_attribute("data-boot-error") is None
    assert page.locator('#node-bootstrap [data-role="boot-error"]').count() == 0
    assert not errors, errors


def _loaded(env: AdminEnv, page: Any, width: int = 1440) -> None:
    page.set_viewport_size({"width": width, "height": 1200})
    page.goto(env.admin + "/", wait_until="domcontentloaded", timeout=20_000)
    page.wait_for_selector("#node-worker-0 .step", timeout=15_000)
    page.wait_for_selector("#live.on", timeout=15_000)


def test_dashboard_says_what_the_cluster_loop_waits_for(env: AdminEnv, page: Any) -> None:
    """No kubeconfig yet: the GPU panel says so (not a later GPU step); the bootstrap row
    is words, not JSON."""
    _loaded(env, page)
    page.wait_for_function("document.querySelector('#gpu').innerText.includes('bootstrap')")
    gpu = page.locator("#gpu").inner_text()
    assert "waiting for the kubeconfig" in gpu, gpu
    assert "ignition/auth/kubeconfig" in gpu, gpu
    assert "{" not in gpu and "waiting_for" not in gpu, gpu
    # The API is down: the GPU status says it waits for the API, whatever step is stored.
    page.evaluate(
        """renderCluster({running: true, gpu: {step: "operator", waiting: "CSV x",
                                               validated: {"worker-0": 1700000000}},
           bootstrap: {complete: true, time: 1700000000, why: "ConfigMap complete",
                       drained: true},
           service: {connection: {state: "unreachable", detail: "10.0.0.5:6443 refused"},
                     gpu: {step: "operator", status: "waiting for CSV x for 3 min"},
                     bootstrap: {complete: true, time: 1700000000, drained: true}}})"""
    )
    gpu = page.locator("#gpu").inner_text()
    assert "waiting for the Kubernetes API" in gpu and "10.0.0.5:6443 refused" in gpu, gpu
    assert "waiting for CSV x" not in gpu, gpu
    assert "complete" in gpu and "{" not in gpu, gpu
    assert "validated\nworker-0" in gpu, gpu


def test_dashboard_ingress_rows_show_where_the_check_goes(env: AdminEnv, page: Any) -> None:
    _loaded(env, page)
    page.evaluate(
        """renderBackends({running: true, splice: true, frontends: {ingress_http: {
             listen: "10.0.0.2:80", balance: "source", active: 0, counters: {},
             check: {kind: "http", port: 1936, path: "/healthz/ready", interval: 2},
             backends: [{name: "worker-0", address: "10.0.0.5:80", health: "up",
                         admin: "enabled", active: 0, total: 3, checks: []}]}}})"""
    )
    row = page.locator("#backends tbody tr").first.inner_text()
    assert "10.0.0.5:80" in row and ":1936" in row, row


def test_dashboard_stage_labels_are_not_cut_at_1400_px(env: AdminEnv, page: Any) -> None:
    _loaded(env, page, width=1400)
    cut = page.eval_on_selector_all(
        ".step .label",
        "els => els.filter(e => e.scrollWidth > e.clientWidth + 0.5).map(e => e.textContent)",
    )
    assert not cut, cut


def _readme_command() -> list[str]:
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("chromium --headless"):
            return shlex.split(line)
    raise AssertionError("no `chromium --headless ... --screenshot` command in README.md")


# Pixels of the page's "live" dot (--ok) and of its "offline" dot (--bad), in the header.
COUNT_DOTS = """async (src) => {
  const img = new Image(); img.src = src; await img.decode();
  const c = document.createElement("canvas"); c.width = img.width; c.height = 70;
  const g = c.getContext("2d"); g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, 70).data;
  const near = (i, r, gr, b) =>
    Math.abs(d[i] - r) + Math.abs(d[i + 1] - gr) + Math.abs(d[i + 2] - b) < 30;
  let ok = 0, bad = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (near(i, 55, 179, 107)) ok++;
    if (near(i, 229, 83, 75)) bad++;
  }
  return [ok, bad];
}"""


def test_the_readme_screenshot_command_shows_the_loaded_page(
    env: AdminEnv, page: Any, tmp_path: Path
) -> None:
    """Exactly README's command (its URL and output file pointed here; --no-sandbox as
    root, as README says): the picture is the loaded page, with the live dot, not the
    red "offline" one."""
    argv = _readme_command()
    out = tmp_path / "shot.png"
    argv = [
        env.admin + "/" if a == "http://127.0.0.1:9000/"
        else f"--screenshot={out}" if a.startswith("--screenshot=")
        else CHROMIUM if a == "chromium" else a
        for a in argv
    ]  # fmt: skip
    if os.geteuid() == 0:
        argv.insert(1, "--no-sandbox")
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    argv.insert(1, f"--user-data-dir={profile}")  # not the operator's profile
    subprocess.run(argv, check=True, capture_output=True, timeout=60, cwd=tmp_path)
    png = base64.b64encode(out.read_bytes()).decode()
    ok, bad = page.evaluate(COUNT_DOTS, f"data:image/png;base64,{png}")
    assert ok > 10 and bad == 0, (ok, bad)
