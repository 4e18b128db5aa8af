"""python benchmarks/prune_wheels.py DIR   (benchmarks/unsloth_wheels.sh runs it)

Cuts what the benchmark's Unsloth peer never imports out of the unsloth wheels in DIR, so that they travel
in the GPU machine's 64 MiB carry, and rewrites each pruned wheel's RECORD to list exactly what is left,
with its hashes: pip installs such a wheel as it would the original, and nothing names a missing file.
"""
from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

# wheel name prefix: (folders to drop, files under them that `import unsloth` still reads)
PRUNE = {
    # studio/: Unsloth's web UI (82 MB unpacked); unsloth_cli/: its command line. Training imports neither.
    "unsloth-": (("studio/", "unsloth_cli/"), ()),
    # unsloth_zoo/mlx/: Apple's MLX backend; unsloth_zoo/__init__.py asks mlx.runtime whether MLX is there.
    "unsloth_zoo-": (("unsloth_zoo/mlx/",), ("unsloth_zoo/mlx/__init__.py", "unsloth_zoo/mlx/runtime.py")),
}


def record_line(name: str, content: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(content)}"


def prune_wheel(wheel: Path, drop: tuple, keep: tuple = ()) -> list[str]:
    """Rewrite `wheel` without the members under `drop` (except `keep`); returns the names removed."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        removed = [n for n in names if n.startswith(drop) and n not in keep]
        if not removed:
            return []
        data = {n: z.read(n) for n in names if n not in removed}
    record = next(n for n in data if n.endswith(".dist-info/RECORD"))
    lines = [record_line(n, c) for n, c in data.items() if n != record] + [f"{record},,"]
    data[record] = ("\n".join(lines) + "\n").encode()
    tmp = wheel.with_name(wheel.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
        for name, content in data.items():
            out.writestr(name, content)
    tmp.replace(wheel)
    return removed


def rules_for(wheel_name: str):
    """The PRUNE entry of a wheel file name ("unsloth-2026..." vs "unsloth_zoo-2026..."), or None."""
    return next((rule for prefix, rule in PRUNE.items()
                 if wheel_name.startswith(prefix) and wheel_name[len(prefix):][:1].isdigit()), None)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        sys.exit("usage: python benchmarks/prune_wheels.py DIR (a folder of downloaded wheels)")
    for wheel in sorted(Path(argv[0]).glob("*.whl")):
        rule = rules_for(wheel.name)
        if rule is None:
            continue
        before = wheel.stat().st_size
        removed = prune_wheel(wheel, *rule)
        folders = sorted({prefix for prefix in rule[0] for n in removed if n.startswith(prefix)})
        print(f"{wheel.name}: " + (f"removed {len(removed)} files under {', '.join(folders)}: "
                                   f"{before / 2**20:.1f} -> {wheel.stat().st_size / 2**20:.1f} MiB"
                                   if removed else "nothing to remove"))


if __name__ == "__main__":
    main()
