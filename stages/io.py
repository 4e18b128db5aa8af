"""Small I/O helpers every stage shares: one-line user errors, atomic writes, JSONL reading.

A stage's `main()` is wrapped in `cli`, so a `UserError` raised anywhere below it ends the process
with one line on stderr and exit status 2 instead of a traceback.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


class UserError(Exception):
    """A problem the user can fix (bad params, bad data, missing model): printed as one line."""


def cli(main: Callable[..., Any]) -> Callable[..., Any]:
    """Run `main`, turning a UserError into `error: …` on stderr and exit status 2; the known
    harmless library warnings (stages/quiet.py) are silenced first."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from stages.quiet import silence_known_warnings

        silence_known_warnings()
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds.

    Works for files and directories. An interrupted stage therefore never leaves an output that
    looks finished: either the old one, or nothing, or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(path: str, flag: str, directory: bool = False) -> None:
    """An output written only at the end of long work (hours of generation, minutes of merging):
    check first that it can be. Probes as atomic_path writes (a temporary entry in the target's
    directory, then a rename), in the nearest existing directory when the target's own is yet to be
    created; leaves nothing. `directory`: the output is a directory, else a file."""
    target = Path(path)
    if directory and target.exists() and not target.is_dir():
        raise UserError(f"{flag} {path}: is a file, not a directory")
    if not directory and target.is_dir():
        raise UserError(f"{flag} {path}: is a directory, not a file")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: cannot be created ({parent} is not a directory)")
    try:
        Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".probe", dir=parent)).rmdir()
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot be written ({parent}: {exc.strerror or exc})") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; a malformed line is a UserError naming file:line."""
    return [row for _, row in read_jsonl_numbered(path)]


def read_jsonl_numbered(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number in the file, row) for each non-blank line, so that messages about a row name
    the line an editor shows, blank lines included; bad JSON or bytes are a UserError at file:line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found (run the stage that writes it, e.g. `dvc repro`)")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1}); re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


def write_errors() -> tuple[type[BaseException], ...]:
    """What a full disk raises while saving: OSError (ENOSPC) from Python, RuntimeError from torch.save's
    C++ writer (`[enforce fail at inline_container.cc:...] . unexpected pos`), SafetensorError."""
    errors: tuple[type[BaseException], ...] = (OSError, RuntimeError)
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError

        errors += (SafetensorError,)
    return errors


def is_write_error(exc: BaseException) -> bool:
    import torch

    # An OOM is a RuntimeError too, and has its own message (main's OutOfMemoryError handler).
    return isinstance(exc, write_errors()) and not isinstance(exc, torch.OutOfMemoryError)
