"""python -m stages.set_params params.yaml model.name=models/tiny-llama data.num_problems=300 ...

Sets `section.key` values in a params file in place, touching only those values: comments, order,
quoting and `null`s elsewhere stay as written, so `git diff params.yaml` shows exactly what was set
(`dvc exp run -S` re-serialises the whole file). Values are YAML (`32`, `null`, `[a, b]`, `"x y"`).
Every key must already be in the file; the result is validated like any stage's params before it
is written, and nothing is written when a key or value is refused. `make demo` uses it.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from stages.config import SECTIONS, parse_section
from stages.io import UserError, atomic_path, cli

SECTION_RE = re.compile(r"^([A-Za-z_][\w-]*):\s*(#.*)?$")
KEY_RE = re.compile(r"^(\s+)([A-Za-z_][\w-]*):(\s*)(.*?)(\s+#.*)?$")


def set_values(text: str, assignments: dict[str, str], where: str = "params.yaml") -> str:
    """`text` with each `section.key` given a new value (YAML source text), else unchanged. A value
    written over several lines (a folded string) is replaced by its one-line form."""
    lines = text.splitlines(keepends=True)
    for dotted, value in assignments.items():
        section, _, key = dotted.partition(".")
        current, start = None, None
        for i, line in enumerate(lines):
            head = SECTION_RE.match(line.rstrip("\n"))
            if head:
                current = head.group(1)
                continue
            m = KEY_RE.match(line.rstrip("\n"))
            if current == section and m and len(m.group(1)) == 2 and m.group(2) == key:
                start = i
                break
        if start is None:
            raise UserError(f"{where}: {dotted}: not in the file (set_params changes existing keys only)")
        indent, name, space, _old, comment = KEY_RE.match(lines[start].rstrip("\n")).groups()
        end = start + 1  # continuation lines of a multi-line value are indented deeper than the key
        while end < len(lines) and lines[end].strip() and len(lines[end]) - len(lines[end].lstrip()) > len(indent):
            end += 1
        new = f"{indent}{name}: {value}"
        if comment:  # keep the comment where it was, when the new value leaves room
            column = lines[start].index(comment) + len(comment) - len(comment.lstrip())
            new = new.ljust(column - 1) + " " + comment.strip()
        new += "\n"
        lines[start:end] = [new]
    return "".join(lines)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("params")
    parser.add_argument("assignments", nargs="+", metavar="section.key=value")
    args = parser.parse_args(argv)
    path = Path(args.params)
    assignments = {}
    for item in args.assignments:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise UserError(f"{item!r}: expected section.key=value")
        assignments[key] = value
    if not path.is_file():
        raise UserError(f"{path}: params file not found")
    text = set_values(path.read_text(encoding="utf-8"), assignments, str(path))
    import yaml

    written = yaml.safe_load(text)
    for name in SECTIONS:  # refused values leave the file as it was
        parse_section(name, written.get(name), str(path))
    for key, value in assignments.items():
        section, _, name = key.partition(".")
        if written[section][name] != yaml.safe_load(value):
            raise UserError(f"{path}: {key}: could not be set to {value!r}")
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"set_params: {path}: " + ", ".join(f"{k}={v}" for k, v in assignments.items()))


if __name__ == "__main__":
    main()
