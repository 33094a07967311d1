"""Prompt files as people keep them: plain text, CSV/TSV with a header, or JSON Lines.

- `.txt` (or no suffix): one prompt a line; blank lines and `#` comments skipped.
- `.csv` / `.tsv`: a header row; the prompts are one column: `column` if given, else the first
  of `prompt`, `caption`, `text` present (any case), else the only column.
- `.jsonl`: one JSON object a line (blank lines skipped), the prompt under `column`, else under
  the same default keys, else the object's only key; a line may also be a bare JSON string.
- `.json`: one JSON array whose items are strings or objects (read as `.jsonl`'s lines are).

Any other suffix is refused with one line naming the ones calibjob reads.

`first` keeps the first N prompts (the spec's `--num-prompts`); rows after them are not read.
Every prompt is stripped and checked: no empty one, no line break inside, no duplicate, and the
file must be UTF-8 (a byte-order mark is allowed). Each would silently skew which conditioning
the calibration set covers, so each is refused with one line naming the file, the row and the
problem.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from calibjob.config import resolve_prompt_path
from calibjob.errors import ConfigError

DEFAULT_COLUMNS = ("prompt", "caption", "text")
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
SUFFIXES = (".txt", ".csv", ".tsv", ".json", ".jsonl")


def read_prompts(
    path: str | Path, column: str | None = None, first: int = 0
) -> tuple[str, ...]:
    """The checked prompts of a prompt file (see the module docstring); `first` 0 keeps all."""
    p = resolve_prompt_path(str(path))
    if not p.is_file():
        raise ConfigError(f"prompt file not found: {path}")
    if first < 0:
        raise ConfigError(f"--num-prompts must be 0 (all) or positive, got {first}")
    text = _decode(p, path)
    suffix = p.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        rows = _table_rows(text, TABLE_SUFFIXES[suffix], column, path)
    elif suffix == ".jsonl":
        rows = _jsonl_rows(text, column, path)
    elif suffix == ".json":
        rows = _json_array_rows(text, column, path)
    elif suffix not in (".txt", ""):
        raise ConfigError(
            f"{path}: calibjob reads prompt files ending in {', '.join(SUFFIXES)} (or no "
            f"suffix, as text), not {suffix}"
        )
    else:
        if column:
            raise ConfigError(
                f"--prompt-column applies to .csv, .tsv, .json and .jsonl files, not {path}"
            )
        rows = _text_rows(text)

    prompts: list[str] = []
    seen: dict[str, str] = {}
    for where, raw in rows:
        if first and len(prompts) == first:
            break
        s = raw.strip()
        if not s:
            raise ConfigError(f"{path}, {where}: empty prompt")
        if "\n" in s or "\r" in s:
            raise ConfigError(f"{path}, {where}: the prompt has a line break inside: {_short(s)}")
        if s in seen:
            raise ConfigError(f"{path}, {where}: repeats the prompt of {seen[s]}: {_short(s)}")
        seen[s] = where
        prompts.append(s)
    if not prompts:
        raise ConfigError(f"prompt file {path} has no prompts")
    if first and len(prompts) < first:
        raise ConfigError(f"--num-prompts {first}, but {path} has only {len(prompts)} prompts")
    return tuple(prompts)


def _decode(p: Path, shown: str | Path) -> str:
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"{shown}, line {line}: not UTF-8 (byte {e.start}); save the file as UTF-8"
        ) from None


def _short(s: str, n: int = 60) -> str:
    return repr(s if len(s) <= n else s[: n - 1] + "…")


def _text_rows(text: str) -> Iterator[tuple[str, str]]:
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            yield f"line {i}", line


def _pick_column(names: list[str], column: str | None, shown: str | Path) -> str:
    """The column (or key) holding the prompts: the one asked for, a default name, the only one."""
    if column:
        if column not in names:
            raise ConfigError(
                f"{shown}: no column {column!r} (columns: {', '.join(map(repr, names))})"
            )
        return column
    lower = {n.strip().lower(): n for n in names}
    for want in DEFAULT_COLUMNS:
        if want in lower:
            return lower[want]
    if len(names) == 1:
        return names[0]
    raise ConfigError(
        f"{shown}: columns {', '.join(map(repr, names))} include none named "
        f"{', '.join(DEFAULT_COLUMNS)}; choose one with --prompt-column"
    )


def _table_rows(
    text: str, delimiter: str, column: str | None, shown: str | Path
) -> Iterator[tuple[str, str]]:
    """(where, cell) per data row; 'row R' counts as a spreadsheet does (the header is row 1)."""
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
        if not header or not any(h.strip() for h in header):
            raise ConfigError(f"{shown}: no header row (the first row names the columns)")
        col = _pick_column(header, column, f"{shown}, row 1 (the header)")
        at = header.index(col)
        for r, cells in enumerate(reader, 2):
            if not cells:
                continue  # a blank line (a row of empty cells is an empty prompt)
            if at >= len(cells):
                raise ConfigError(f"{shown}, row {r}: no {col!r} cell (the row is short)")
            yield f"row {r}", cells[at]
    except csv.Error as e:
        raise ConfigError(f"{shown}, line {reader.line_num}: not valid CSV ({e})") from None


def _jsonl_rows(text: str, column: str | None, shown: str | Path) -> Iterator[tuple[str, str]]:
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"line {i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{shown}, {where}: not JSON ({e.msg})") from None
        yield where, _json_prompt(obj, column, shown, where)


def _json_array_rows(
    text: str, column: str | None, shown: str | Path
) -> Iterator[tuple[str, str]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{shown}, line {e.lineno}: not JSON ({e.msg})") from None
    if not isinstance(items, list):
        raise ConfigError(f"{shown}: expected a JSON array of prompts, got {_json_kind(items)}")
    for i, obj in enumerate(items, 1):
        yield f"item {i}", _json_prompt(obj, column, shown, f"item {i}")


def _json_prompt(obj: object, column: str | None, shown: str | Path, where: str) -> str:
    """A prompt from one JSON value: a bare string, or an object's prompt key."""
    if isinstance(obj, str) and not column:
        return obj
    if not isinstance(obj, dict):
        raise ConfigError(f"{shown}, {where}: expected a JSON object, got {_json_kind(obj)}")
    if column and column not in obj:
        raise ConfigError(f"{shown}, {where}: no key {column!r}")
    key = _pick_column(list(obj), column, f"{shown}, {where}")
    value = obj[key]
    if not isinstance(value, str):
        raise ConfigError(f"{shown}, {where}: {key!r} is {_json_kind(value)}, not text")
    return value


def _json_kind(v: object) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "an object", str: "a string"}.get(type(v), type(v).__name__)  # fmt: skip
