"""What the daemon says, without sockets: the first health verdicts of a frontend are
one summary line (once every probed backend has one), and the open-files advice names
the knob of where the daemon runs (a systemd unit or a shell)."""

from __future__ import annotations

from ipaddress import IPv4Address

from appliance.fdbudget import raise_advice
from appliance.plan import Backend
from services.proxy.pool import BackendState
from services.proxy.server import first_verdicts


def states(n: int) -> list[BackendState]:
    return [
        BackendState(Backend(f"master-{i}", IPv4Address(f"10.33.3.{50 + i}"), 6443, "master"), 2, 3)
        for i in range(n)
    ]


def test_summary_waits_for_every_first_verdict_then_counts_the_up_ones() -> None:
    pool = states(4)
    assert first_verdicts("api", pool, 2.0) is None  # none checked yet
    pool[0].check_result(True, 1.0)
    pool[1].check_result(False, 1.0)
    pool[2].check_result(False, 1.0)
    assert first_verdicts("api", pool, 2.0) is None  # master-3 not checked yet
    pool[3].check_result(False, 1.0)
    assert first_verdicts("api", pool, 2.0) == "api: 1 of 4 backends up yet; checking every 2 s"


def test_summary_of_all_up_and_disabled_backends_not_waited_for() -> None:
    pool = states(3)
    pool[2].admin = "disabled"  # never probed: its health stays unknown
    for b in pool[:2]:
        b.check_result(True, 1.0)
    assert first_verdicts("ingress_http", pool, 0.5) == "ingress_http: 2 of 2 backends up"


def test_advice_speaks_to_systemd_or_a_shell() -> None:
    assert "LimitNOFILE=" in raise_advice({"INVOCATION_ID": "abc"})
    assert "LimitNOFILE=" in raise_advice({"NOTIFY_SOCKET": "/run/systemd/notify"})
    shell = raise_advice({"INVOCATION_ID": "", "HOME": "/root"})
    assert "ulimit -n" in shell and "LimitNOFILE" not in shell
