"""Input discovery and document reading for `dsv3 prepare`.

A document is one text file, one line of a .jsonl file, or one row of a .parquet file. Inputs are expanded
in a fixed order (arguments in the order given; directory contents and glob matches sorted) so that the
same command always sees the same documents in the same order.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dsv3.errors import UserError

DEFAULT_EXTENSIONS = ("txt", "md", "rst", "py", "jsonl", "parquet")
GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Source:
    """One input file and how to read documents out of it."""

    path: Path
    kind: str  # "text" | "jsonl" | "parquet"


@dataclass(frozen=True)
class ReadOptions:
    """How documents are pulled out of files."""

    jsonl_field: str = "text"
    parquet_column: str = "text"
    encoding_errors: str = "strict"  # str.decode errors=: strict | replace | ignore


def kind_of(path: Path) -> str:
    """The reader for a file, from its extension."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def _walk(directory: Path, extensions: tuple[str, ...], exclude: tuple[Path, ...]) -> list[Path]:
    """Files under ``directory`` with one of ``extensions``, sorted, skipping hidden entries and ``exclude``."""
    found = []
    for root, dirs, files in os.walk(directory):
        root_path = Path(root)
        # Hidden dirs (.git, .venv) are never documents; sorting dirs in place fixes the walk order.
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and not any((root_path / d).resolve() == e for e in exclude))
        for name in files:
            if name.startswith("."):
                continue
            if name.rsplit(".", 1)[-1].lower() in extensions and "." in name:
                found.append(root_path / name)
    return sorted(found)


def expand_inputs(inputs: list[str], extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
                  exclude: tuple[Path, ...] = ()) -> list[Source]:
    """Expand files, directories (recursive, filtered by extension) and globs into an ordered source list.

    A file named explicitly is always taken whatever its extension; duplicates keep their first position.
    """
    extensions = tuple(e.lower().lstrip(".") for e in extensions)
    exclude = tuple(Path(e).resolve() for e in exclude)
    paths: list[Path] = []
    for arg in inputs:
        if any(c in GLOB_CHARS for c in arg) and not Path(arg).exists():
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise UserError(f"no files match {arg!r}; check the pattern (quote it so the shell does not expand it)")
            for m in matches:
                p = Path(m)
                paths.extend(_walk(p, extensions, exclude) if p.is_dir() else [p])
            continue
        p = Path(arg)
        if p.is_dir():
            files = _walk(p, extensions, exclude)
            if not files:
                raise UserError(f"directory {p} holds no files with extensions {','.join(extensions)}; "
                                f"pass --ext to choose extensions")
            paths.extend(files)
        elif p.is_file():
            paths.append(p)
        elif p.exists():
            raise UserError(f"input {p} is neither a file nor a directory; pass text, .jsonl or .parquet files")
        else:
            raise UserError(f"input not found: {p}; check the path")
    seen: set[Path] = set()
    sources = []
    for p in paths:
        key = p.resolve()
        if key in seen or any(key == e or e in key.parents for e in exclude):
            continue
        seen.add(key)
        sources.append(Source(p, kind_of(p)))
    if not sources:
        raise UserError("no input files found; pass text files, directories, globs, .jsonl or .parquet files")
    return sources


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}; check its permissions or remove it from the inputs") from None


def _decode(data: bytes, where: str, errors: str) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not valid UTF-8 (byte {e.start}); convert it, exclude it, "
                        f"or pass --encoding-errors replace") from None


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():  # blank lines are not documents
                yield lineno, line


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}; check its permissions or remove it from the inputs") from None


def _parquet_file(path: Path, column: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading .parquet needs pyarrow: pip install 'dsv3[data]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet bytes
        raise UserError(f"cannot read parquet file {path}: {e}; check the file or remove it from the inputs") from None
    if column not in pf.schema_arrow.names:
        raise UserError(f"parquet file {path} has no column {column!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                        f"pass --parquet-column")
    return pf


def _is_text_type(arrow_type) -> bool:
    import pyarrow as pa

    checks = [pa.types.is_string, pa.types.is_large_string, getattr(pa.types, "is_string_view", None)]
    return any(check and check(arrow_type) for check in checks)


def count_documents(source: Source, options: ReadOptions) -> int:
    """How many documents ``source`` holds, without decoding them (used to draw the train/val split)."""
    if source.kind == "text":
        return 1
    if source.kind == "jsonl":
        return sum(1 for _ in _jsonl_lines(source.path))
    return _parquet_file(source.path, options.parquet_column).metadata.num_rows


def iter_documents(source: Source, options: ReadOptions) -> Iterator[str]:
    """Yield the text of each document of ``source`` ("" for a null value, so counts stay aligned)."""
    if source.kind == "text":
        yield _decode(_read_bytes(source.path), str(source.path), options.encoding_errors)
    elif source.kind == "jsonl":
        field = options.jsonl_field
        for lineno, line in _jsonl_lines(source.path):
            where = f"{source.path}:{lineno}"
            try:
                record = json.loads(_decode(line, where, options.encoding_errors))
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg}); fix the line or remove the file") from None
            if not isinstance(record, dict) or field not in record:
                raise UserError(f"{where}: no field {field!r}; pass --jsonl-field with the field holding the text")
            value = record[field]
            if value is None:
                yield ""
            elif isinstance(value, str):
                yield value
            else:
                raise UserError(f"{where}: field {field!r} is a {type(value).__name__}, not a string; "
                                f"pass --jsonl-field with a text field")
    else:
        pf = _parquet_file(source.path, options.parquet_column)
        for batch in pf.iter_batches(columns=[options.parquet_column], batch_size=1024):
            column = batch.column(0)
            if not _is_text_type(column.type):
                raise UserError(f"parquet column {options.parquet_column!r} of {source.path} has type {column.type}, "
                                f"not string; pass --parquet-column with a text column")
            for value in column.to_pylist():
                yield value or ""
