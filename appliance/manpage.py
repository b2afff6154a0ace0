"""appliance(1) in troff man(7) macros, generated from the argparse parser.

Write it with: python -m appliance.manpage > docs/appliance.1 (a unit test fails when stale).
"""

from __future__ import annotations

import argparse

from appliance import __version__
from appliance.completion import _options, _subparsers


def _esc(text: str) -> str:
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + ln if ln[:1] in ".'" else ln for ln in out.splitlines())


def _opt(a: argparse.Action) -> list[str]:
    names = (
        ", ".join(f"\\fB{_esc(o)}\\fR" for o in a.option_strings)
        or f"\\fI{a.metavar or a.dest}\\fR"
    )
    if a.option_strings and a.nargs != 0:
        names += f" \\fI{_esc(str(a.metavar or a.dest.upper()))}\\fR"
    text = str(a.help or "")
    if a.choices:
        text += f" (one of: {', '.join(str(c) for c in a.choices)})"
    return [".TP", names, _esc(text)]


def manpage(parser: argparse.ArgumentParser) -> str:
    subs = _subparsers(parser)
    lines = [
        f'.TH APPLIANCE 1 "" "appliance {__version__}" "User Commands"',
        ".SH NAME",
        "appliance \\- " + _esc(str(parser.description)),
        ".SH SYNOPSIS",
        ".B appliance",
        "[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]",
        ".SH DESCRIPTION",
        _esc(str(parser.epilog)),
        ".SH OPTIONS",
    ]
    for a in _options(parser):
        lines += _opt(a)
    lines.append(".SH COMMANDS")
    for name, sp in subs.items():
        lines += [".SS " + _esc(name), _esc(str(sp.description))]
        for a in sp._actions:
            if a.help != argparse.SUPPRESS and a.dest != "help":
                lines += _opt(a)
    lines += [
        ".SH ENVIRONMENT",
        ".TP",
        "\\fBAPPLIANCE_CONFIG\\fR",
        "inventory file used when \\fB\\-\\-config\\fR is not given.",
        ".TP",
        "\\fBAPPLIANCE_ADMIN\\fR",
        "admin endpoint URL for the client commands.",
        ".TP",
        "\\fBAPPLIANCE_TOKEN_FILE\\fR",
        "admin token file for the client commands.",
        ".TP",
        "\\fBAPPLIANCE_MEMBER\\fR",
        "with an \\fIha\\fR block: the member \\fBrun\\fR is when "
        "\\fB\\-\\-member\\fR is not given.",
        ".TP",
        "\\fBAPPLIANCE_DEBUG\\fR",
        "print a traceback on internal errors.",
        ".SH FILES",
        ".TP",
        "\\fI/etc/appliance/inventory.yaml\\fR",
        "the default inventory.",
        ".TP",
        "\\fI/var/lib/appliance/admin.token\\fR",
        "the admin token (in the state_dir).",
        ".SH EXAMPLES",
    ]
    for name, sp in subs.items():
        lines += [".TP", "\\fB" + _esc(name) + "\\fR", _esc(str(sp.epilog))]
    lines += [".SH SEE ALSO", "\\fBdnsmasq\\fR(8), \\fBhaproxy\\fR(1)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    from appliance.cli import _parser

    print(manpage(_parser()), end="")
