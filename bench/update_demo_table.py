"""Pastes the table of `lvlm demo --seeds=N` into README.md, verbatim, between its markers.

    python bench/update_demo_table.py --workdir=/tmp/demo_seeds --seeds=3   # runs the demo
    python bench/update_demo_table.py --log=demo.log                        # a run's output

The table is the run's own output (every seed's figures, their median and min-max, and the line
naming the date, package versions and CPU); nothing is typed by hand. With --log, the output of
a run made elsewhere (a fresh clone in a fresh venv) is used as it is.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
START, END = "<!-- demo table: start -->", "<!-- demo table: end -->"
TITLE = re.compile(r"^lvlm demo results, \d+ seeds")


def seeds_table(output: str) -> str:
    """The last seeds table in a demo's output: its title line to the end of the output."""
    lines = output.replace("\r", "\n").splitlines()
    starts = [i for i, line in enumerate(lines) if TITLE.match(line)]
    if not starts:
        raise ValueError("no 'lvlm demo results, N seeds' table in the output: was it run with "
                         "--seeds of 2 or more, to the end?")
    table = lines[starts[-1]:]
    while table and not table[-1].strip():
        table.pop()
    return "\n".join(table)


def paste(table: str, command: str, readme: str = README) -> None:
    with open(readme) as f:
        text = f.read()
    if START not in text or END not in text:
        raise ValueError(f"{readme} lacks the markers {START} ... {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    block = f"{START}\n`{command}` printed:\n\n```\n{table}\n```\n{END}"
    with open(readme, "w") as f:
        f.write(head + block + tail)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", help="run `lvlm demo --seeds=N --workdir=DIR` here")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--log", help="the saved output of such a run, instead of running it")
    p.add_argument("--readme", default=README)
    args = p.parse_args()
    if bool(args.workdir) == bool(args.log):
        p.error("give one of --workdir (run the demo) or --log (a run's output)")
    if args.log:
        with open(args.log, errors="replace") as f:
            output = f.read()
    else:
        cmd = ["lvlm", "demo", f"--seeds={args.seeds}", f"--workdir={args.workdir}"]
        run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = run.stdout
        sys.stdout.write(output)
        if run.returncode:
            print(f"{' '.join(cmd)} failed with exit code {run.returncode}", file=sys.stderr)
            return run.returncode
    try:
        table = seeds_table(output)
        seeds = len(re.findall(r"seed \d+", table.splitlines()[2]))
        paste(table, f"lvlm demo --seeds={seeds} --workdir=DIR", args.readme)
    except (ValueError, OSError) as e:
        print(f"update_demo_table: {e}", file=sys.stderr)
        return 1
    print(f"pasted a {seeds}-seed table into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
