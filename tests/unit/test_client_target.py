"""The client's lenient view of an inventory (listen.admin, state_dir) and the plan diff
`appliance diff` prints: pure, no daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.client import ClientError, dict_diff, target_for

GOOD = """\
cluster:
  name: demo
  base_domain: example.com
listen:
  admin: "[::1]:9100"
state_dir: state
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    return path


def test_reads_listen_admin_and_state_dir(tmp_path: Path) -> None:
    t = target_for(write(tmp_path, GOOD))
    assert t.base == "http://[::1]:9100"
    assert t.token_file == tmp_path / "state" / "admin.token"  # relative to the file
    assert t.domain == "demo.example.com" and t.where == "listen.admin"


def test_a_yaml_error_elsewhere_is_not_fatal(tmp_path: Path) -> None:
    t = target_for(write(tmp_path, GOOD + "nodes: [unclosed\n  - {name: x\n"))
    assert t.base == "http://[::1]:9100" and t.token_file == tmp_path / "state" / "admin.token"


def test_defaults_and_switched_off(tmp_path: Path) -> None:
    t = target_for(write(tmp_path, "cluster: {name: a, base_domain: b}\n"))
    assert t.base == "http://127.0.0.1:9000"
    assert t.token_file == Path("/var/lib/appliance/admin.token")
    assert target_for(write(tmp_path, "listen: {admin: null}\n")).base is None
    wildcard = target_for(write(tmp_path, "listen: {admin: '0.0.0.0:9001'}\n"))
    assert wildcard.base == "http://127.0.0.1:9001"


def test_flags_win_over_the_file(tmp_path: Path) -> None:
    t = target_for(write(tmp_path, GOOD), "127.0.0.2:7000", "/x/token")
    assert (t.base, t.token_file, t.where) == ("http://127.0.0.2:7000", Path("/x/token"), "--admin")
    assert target_for(None, "https://h.example:8443/").base == "https://h.example:8443"
    t = target_for(tmp_path / "absent.yaml", "http://127.0.0.1:1")
    assert t.config is None  # an unreadable file is not compared with the daemon's


@pytest.mark.parametrize(
    ("text", "admin", "message"),
    [
        ("listen: [\n", None, "cannot find listen.admin"),
        ("listen: {admin: 'nowhere'}\n", None, "listen.admin in"),
        (GOOD, "ftp://h", "expected http://HOST:PORT"),
        (GOOD, "h:1:2", "--admin 'h:1:2'"),
    ],
)
def test_clear_errors(tmp_path: Path, text: str, admin: str | None, message: str) -> None:
    with pytest.raises(ClientError, match=message.replace("(", r"\(")):
        target_for(write(tmp_path, text), admin)


def test_dict_diff_matches_named_items() -> None:
    old = {"nodes": [{"name": "a", "ip": "1"}, {"name": "b", "ip": "2"}], "ttl": 5}
    new = {"nodes": [{"name": "b", "ip": "3"}, {"name": "c", "ip": "4"}], "ttl": 5, "x": 1}
    assert dict_diff(old, new) == [
        "- nodes.a",
        '~ nodes.b.ip: "2" -> "3"',
        '+ nodes.c: {"name": "c", "ip": "4"}',
        "+ x: 1",
    ]
    assert dict_diff(old, old) == []
    many = dict_diff({"k": list(range(300))}, {"k": list(range(1, 301))})
    assert many == ["~ k: " + many[0].removeprefix("~ k: ")]  # a plain list: one line


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "a.yaml", "--log-format", "json", "--admin", "h:1", "status"],
        ["status", "--config", "a.yaml", "--log-format", "json", "--admin", "h:1"],
        ["--config", "b.yaml", "status", "--config", "a.yaml", "--log-format", "json",
         "--admin", "h:1"],  # after the subcommand wins, as with any repeated option
    ],
)  # fmt: skip
def test_global_options_before_or_after_the_subcommand(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.cli import _parser

    monkeypatch.delenv("APPLIANCE_ADMIN", raising=False)
    args = _parser().parse_args(argv)
    assert (args.config, args.log_format, args.admin) == ("a.yaml", "json", "h:1")


def test_config_default_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.cli import _parser

    monkeypatch.delenv("APPLIANCE_CONFIG", raising=False)
    assert _parser().parse_args(["status"]).config == "/etc/appliance/inventory.yaml"
    monkeypatch.setenv("APPLIANCE_CONFIG", "/srv/inv.yaml")
    monkeypatch.setenv("APPLIANCE_TOKEN_FILE", "/srv/token")
    args = _parser().parse_args(["nodes"])
    assert (args.config, args.token_file) == ("/srv/inv.yaml", "/srv/token")
