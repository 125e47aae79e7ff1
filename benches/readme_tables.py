#!/usr/bin/env python
"""Put a table a run wrote into README.md, between its markers.

    python benches/readme_tables.py NAME FILE.md [README.md]

Replaces what lies between ``<!-- NAME -->`` and ``<!-- /NAME -->`` with the
file's text, so that the README's figures come from the run, not from typing.
"""

import sys
from pathlib import Path


def splice(readme: Path, name: str, text: str) -> None:
    doc = readme.read_text()
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if begin not in doc or end not in doc:
        sys.exit(f"readme_tables: {readme} has no {begin} ... {end} block")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{text.strip()}\n{end}{tail}")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    splice(Path(sys.argv[3] if len(sys.argv) == 4 else "README.md"), sys.argv[1],
           Path(sys.argv[2]).read_text())
