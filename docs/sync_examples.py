"""Copies each worked example (docs/examples/*.py) into the pages that quote it.

A page quotes an example as a marker line followed by a fenced block:

    <!-- example: docs/examples/add_stage.py -->
    ```python
    ...the whole file...
    ```

    python docs/sync_examples.py          # rewrite the quoted blocks from the files
    python docs/sync_examples.py --check  # exit 1 when a page and its example differ (a test)
"""

from __future__ import annotations

import glob
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BLOCK = re.compile(r"(<!-- example: (?P<path>[\w./-]+) -->\n```python\n)(?P<code>.*?)(```)",
                   re.DOTALL)


def quoted(page_text: str) -> list[tuple[str, str]]:
    """(example path relative to the repo root, the code the page shows) for each quote."""
    return [(m["path"], m["code"]) for m in BLOCK.finditer(page_text)]


def synced(page_text: str) -> str:
    def replace(m: re.Match) -> str:
        path = os.path.join(ROOT, m["path"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"a page quotes {m['path']}, which does not exist")
        with open(path, encoding="utf-8") as f:
            return m.group(1) + f.read() + m.group(4)

    return BLOCK.sub(replace, page_text)


def pages() -> list[str]:
    return sorted(glob.glob(os.path.join(HERE, "*.md")))


def main(argv: list[str]) -> int:
    stale = []
    for page in pages():
        with open(page, encoding="utf-8") as f:
            text = f.read()
        new = synced(text)
        if new != text:
            stale.append(os.path.relpath(page, ROOT))
            if "--check" not in argv:
                with open(page, "w", encoding="utf-8") as f:
                    f.write(new)
    if "--check" in argv and stale:
        print(f"{', '.join(stale)} quote stale examples: run `python docs/sync_examples.py`",
              file=sys.stderr)
        return 1
    for page in stale:
        print(f"updated {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
