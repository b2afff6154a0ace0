"""The generated completion scripts, exercised by a real bash (and zsh -n when present)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance import completion
from appliance.cli import _parser


def _complete(words: list[str]) -> list[str]:
    """COMPREPLY of the bash script for the words typed, the last one being completed."""
    script = completion.bash(_parser())
    quoted = " ".join("'" + w + "'" for w in words)
    driver = (
        f"{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; "
        'COMP_LINE="${COMP_WORDS[*]}"; _appliance; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    out = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", driver],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert out.stderr == ""
    return [line for line in out.stdout.splitlines() if line]


def test_bash_completes_a_subcommand() -> None:
    assert _complete(["appliance", "ren"]) == ["render"]


def test_bash_completes_render_kinds() -> None:
    assert _complete(["appliance", "render", "--as", ""]) == ["dnsmasq", "haproxy", "hosts", "rbac"]


def test_bash_completes_shells_and_options() -> None:
    assert _complete(["appliance", "completion", ""]) == ["bash", "zsh"]
    assert "--limit" in _complete(["appliance", "unknown", "--l"])
    assert _complete(["appliance", "-c", "x.yaml", "--log-level", "w"]) == ["warning"]


def test_bash_completes_files_for_config(tmp_path: Path) -> None:
    script_words = ["appliance", "check", "--config", "/etc/host"]
    assert "/etc/hostname" in _complete(script_words)


# Drives an interactive zsh through a pseudo-terminal (zsh/zpty), presses TAB after the
# words and records every candidate compadd is given: what a user at a prompt would see.
_ZSH_DRIVER = r"""
zmodload zsh/zpty
zpty z 'zsh -f -i'
zpty -w z "fpath=($1 \$fpath); autoload -Uz compinit; compinit -u -D"
zpty -w z 'compadd () { builtin compadd -O __hits "$@"; print -l -- "<hit>"${^__hits};
  builtin compadd "$@" }'
zpty -w z 'PROMPT=; bindkey "^I" complete-word; zle -C complete-word .complete-word _main_complete'
# Wait until compinit and the setup have run (a loaded machine is slow), then press TAB
# and wait for the first candidate: no fixed sleep that a busy CI could outrun.
zpty -w z 'echo "<rea""dy>"'
out=""; n=0
while (( n++ < 400 )); do
  if zpty -rt z chunk; then out+=$chunk; [[ $out == *"<ready>"* ]] && break
  else sleep 0.05; fi
done
zpty -w -n z "$2"$'\t'
out=""; n=0
while (( n++ < 400 )); do
  if zpty -rt z chunk; then out+=$chunk; [[ $out == *"<hit>"* ]] && break
  else sleep 0.05; fi
done
sleep 0.3
zpty -w z $'\x03 ; echo "<done>"'
n=0
while (( n++ < 200 )); do
  if zpty -rt z chunk; then out+=$chunk; [[ $out == *"<done>"*"<done>"* ]] && break
  else sleep 0.05; fi
done
print -r -- "$out"
zpty -d z
"""


def _zsh_complete(tmp_path: Path, line: str) -> list[str]:
    (tmp_path / "_appliance").write_text(completion.zsh(_parser()))
    driver = tmp_path / "drive.zsh"
    driver.write_text(_ZSH_DRIVER)
    out = subprocess.run(
        ["zsh", "-f", str(driver), str(tmp_path), line],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.replace("\r", "")
    # the echoed command line itself holds '<hit>"${^__hits}': skip the quote
    hits = re.findall(r'<hit>([^\s"]\S*)', out)
    return sorted(set(hits))


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh not installed (CI installs it)")
def test_zsh_script_parses(tmp_path: Path) -> None:
    path = tmp_path / "_appliance"
    path.write_text(completion.zsh(_parser()))
    subprocess.run(["zsh", "-n", str(path)], check=True, timeout=10)


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh not installed (CI installs it)")
def test_zsh_completes_at_a_prompt(tmp_path: Path) -> None:
    assert _zsh_complete(tmp_path, "appliance ren") == ["render"]
    assert _zsh_complete(tmp_path, "appliance render --as ") == [
        "dnsmasq",
        "haproxy",
        "hosts",
        "rbac",
    ]
    assert _zsh_complete(tmp_path, "appliance completion ") == ["bash", "zsh"]
    assert _zsh_complete(tmp_path, "appliance -c x.yaml --log-level w") == ["warning"]
    assert "--limit" in _zsh_complete(tmp_path, "appliance unknown --l")
    assert "hostname" in _zsh_complete(tmp_path, "appliance check --config /etc/host")


def test_every_subcommand_explains_itself() -> None:
    """Each subcommand's --help has a description, an example and help on every argument."""
    missing = []
    for name, sub in completion._subparsers(_parser()).items():
        if not sub.description:
            missing.append(f"{name}: description")
        if not sub.epilog or "appliance " not in sub.epilog:
            missing.append(f"{name}: example epilog")
        missing += [f"{name}: {a.dest} help" for a in sub._actions if not a.help]
    assert missing == []
