"""Shell completion scripts generated from the `appliance` argparse parser.

Walking the parser (not a hand-kept list) keeps completion in step with the commands.
"""

from __future__ import annotations

import argparse

_FILE_METAVARS = {"FILE", "IN", "OUT"}


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings and a.help != argparse.SUPPRESS]


def _wants_file(action: argparse.Action) -> bool:
    return action.metavar in _FILE_METAVARS or "--config" in action.option_strings


def _words(values: list[str]) -> str:
    return " ".join(values)


def bash(parser: argparse.ArgumentParser) -> str:
    """A bash script defining _appliance and registering it with `complete`."""
    subs = _subparsers(parser)
    lines = [
        "# bash completion for appliance (generated: appliance completion bash)",
        "_appliance() {",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
        '    local cmd="" i',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        case "${COMP_WORDS[i]}" in',
        "            -*) ;;",
        f'            {"|".join(subs)}) cmd="${{COMP_WORDS[i]}}"; break ;;',
        "        esac",
        "    done",
        '    case "$cmd:$prev" in',
    ]
    scopes = [*subs.items(), ("*", parser)]  # a subcommand's own options win
    for name, p in scopes:
        for a in _options(p):
            if a.nargs == 0:
                continue
            pattern = "|".join(f"{name}:{o}" for o in a.option_strings)
            if a.choices:
                words = _words([str(c) for c in a.choices])
                reply = f'COMPREPLY=($(compgen -W "{words}" -- "$cur"))'
            elif _wants_file(a):
                reply = 'COMPREPLY=($(compgen -f -- "$cur"))'
            else:
                reply = "COMPREPLY=()"
            lines.append(f"        {pattern}) {reply}; return ;;")
    lines += ["    esac", '    case "$cmd" in']
    top = _words([o for a in _options(parser) for o in a.option_strings])
    lines.append(f'        "") COMPREPLY=($(compgen -W "{_words(list(subs))} {top}" -- "$cur")) ;;')
    for name, p in subs.items():
        opts = _words([o for a in _options(p) for o in a.option_strings])
        positional = [a for a in p._actions if not a.option_strings]
        files = any(_wants_file(a) for a in positional)
        choices = [str(c) for a in positional if a.choices for c in a.choices]
        if files:
            rest = 'COMPREPLY=($(compgen -f -- "$cur"))'
        elif choices:
            rest = f'COMPREPLY=($(compgen -W "{_words(choices)}" -- "$cur"))'
        else:
            rest = "COMPREPLY=()"
        lines.append(
            f'        {name}) if [[ "$cur" == -* ]]; then '
            f'COMPREPLY=($(compgen -W "{opts}" -- "$cur")); else {rest}; fi ;;'
        )
    lines += ["    esac", "}", "complete -o filenames -F _appliance appliance", ""]
    return "\n".join(lines)


def _zsh_quote(text: str) -> str:
    return text.replace("'", "'\\''").replace("[", "\\[").replace("]", "\\]").replace(":", "\\:")


def _zsh_specs(p: argparse.ArgumentParser) -> list[str]:
    specs = []
    for a in _options(p):
        desc = _zsh_quote(str(a.help or "").split("(")[0].strip())
        if a.nargs == 0:
            action = ""
        elif a.choices:
            action = f":{a.dest}:({' '.join(str(c) for c in a.choices)})"
        elif _wants_file(a):
            action = f":{a.dest}:_files"
        else:
            action = f":{a.dest}:"
        names = a.option_strings
        group = "{" + ",".join(names) + "}" if len(names) > 1 else names[0]
        specs.append(
            f"'{group}[{desc}]{action}'" if len(names) == 1 else f"{group}'[{desc}]{action}'"
        )
    for a in p._actions:
        if a.option_strings or isinstance(a, argparse._SubParsersAction):
            continue
        if a.choices:
            what = f"({' '.join(str(c) for c in a.choices)})"
        else:
            what = "_files" if _wants_file(a) else " "
        many = "*" if a.nargs in ("+", "*") else ""
        specs.append(f"'{many}:{a.dest}:{what}'")
    return specs


def zsh(parser: argparse.ArgumentParser) -> str:
    """A zsh script (#compdef) using _arguments for each subcommand."""
    subs = _subparsers(parser)
    cmds = " ".join(f"'{name}'" for name in subs)
    lines = [
        "#compdef appliance",
        "# zsh completion for appliance (generated: appliance completion zsh)",
        "_appliance() {",
        "    local curcontext=$curcontext state line",
        "    _arguments -C \\",
        *(f"        {s} \\" for s in _zsh_specs(parser)),
        "        '1:command:->command' '*::arg:->args'",
        "    case $state in",
        f"        command) local -a cmds; cmds=({cmds}); _describe command cmds ;;",
        "        args) case $line[1] in",
    ]
    for name, sp in subs.items():
        lines.append(f"            {name}) _arguments {' '.join(_zsh_specs(sp))} ;;")
    lines += ["        esac ;;", "    esac", "}", '_appliance "$@"', ""]
    return "\n".join(lines)
