"""Writes docs/cli.md, the `lvlm` command reference, from the argparse parser in lvlm_jax/cli.py.

    python docs/gen_cli.py          # rewrite docs/cli.md
    python docs/gen_cli.py --check  # exit 1 when docs/cli.md is out of date (a test runs this)
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = os.path.join(HERE, "cli.md")

HEADER = """# `lvlm` command reference

Generated from `lvlm_jax/cli.py` by `python docs/gen_cli.py`; do not edit by hand
(`tests/test_docs.py` fails when this page and the code disagree).

Every command that takes `--config=FILE.py[:ARG]` also takes any number of
`--config.a.b=VALUE` overrides of that config's fields; a key the config does not have fails
before anything runs, naming the key. `python -m lvlm_jax` is the same as `lvlm`.
"""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = ", ".join(a.option_strings) or a.metavar or a.dest
        if a.option_strings and a.nargs != 0:
            name += f"={a.metavar or a.dest.upper()}"
        notes = [a.help or ""]
        if a.required:
            notes.append("(required)")
        elif a.option_strings and a.default not in (None, False, argparse.SUPPRESS):
            notes.append(f"(default: `{a.default}`)")
        if a.choices:
            notes.append("one of: " + ", ".join(f"`{c}`" for c in a.choices))
        rows.append(f"| `{name}` | {' '.join(n for n in notes if n)} |")
    return rows


def _section(name: str, parser: argparse.ArgumentParser, help_text: str, level: int) -> list[str]:
    lines = [f"{'#' * level} `{name}`", ""]
    if help_text:
        lines += [help_text[0].upper() + help_text[1:] + ("" if help_text.endswith(".") else "."),
                  ""]
    rows = _option_rows(parser)
    if rows:
        lines += ["| argument | meaning |", "|---|---|", *rows, ""]
    children, helps = _subparsers(parser), _helps(parser)
    for child, sub in children.items():
        lines += _section(f"{name} {child}", sub, helps.get(child, ""), level + 1)
    return lines


def render() -> str:
    from lvlm_jax.cli import parser

    root = parser()
    lines = [HEADER]
    helps = _helps(root)
    for name, sub in _subparsers(root).items():
        lines += _section(f"lvlm {name}", sub, helps.get(name, ""), 2)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        current = open(TARGET, encoding="utf-8").read() if os.path.exists(TARGET) else ""
        if current != text:
            print("docs/cli.md is out of date: run `python docs/gen_cli.py`", file=sys.stderr)
            return 1
        return 0
    with open(TARGET, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    sys.exit(main(sys.argv[1:]))
