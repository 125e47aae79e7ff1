"""Reading data records: JSON Lines, a JSON array of records, Parquet, Python rows.

Every unreadable record (bytes that are not UTF-8, a line that is not JSON, a
value that is not an object) is an error naming the file, line (and byte
offset), or under ``skip_invalid`` a :class:`Record` that carries the error, for
``data.tokenize_sft`` / ``data.read_prompts`` to count and skip. A file that is
not what its name says, or holds no records, is one line naming it.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import FastftError, check


@dataclass
class Record:
    where: str  # "file.jsonl line 7", for errors
    fields: dict
    error: str | None = None  # why it could not be read (kept under skip_invalid, to count)


NL = b"\n"
KINDS = "a .jsonl (JSON Lines), .json (a JSON array of records) or .parquet file"


def check_file(path, name: str = "data") -> Path:
    """``path`` if it is a file; else one line: not found, or a folder."""
    path = Path(path)
    check(not path.is_dir(), f"{name} file {path} is a folder: give {KINDS}")
    check(path.is_file(), f"{name} file {path} not found")
    return path


def read_records(source, name: str = "data", *, skip_invalid: bool = False) -> list[Record]:
    """Records from a path (.jsonl / .json / .parquet), a list of dicts or a datasets.Dataset.

    A JSON file may also be one array of records. A line that is not UTF-8 or not
    JSON is an error naming the file, line (and byte); under ``skip_invalid`` it
    is kept as an invalid Record, which tokenize_sft / read_prompts count and skip.
    A list of Records (read already) is returned as it is.
    """
    if isinstance(source, (str, os.PathLike)):
        path = check_file(source, name)
        try:
            with open(path, "rb") as f:
                head = f.read(4)
                raw = head if head == b"PAR1" else head + f.read()
        except OSError as e:
            raise FastftError(f"cannot read {name} file {path}: {e.strerror}") from e
        check(bool(raw), f"{name} file {path} is empty (0 bytes)")
        check(raw[:2] != b"\x1f\x8b", f"{name} file {path} is gzip-compressed: decompress it "
              "(gunzip) and give the .jsonl")
        if head == b"PAR1" or path.suffix == ".parquet":
            records = _read_parquet(path, head)
            check(bool(records), f"{name} file {path} has no records (a Parquet table of 0 rows)")
            return records
        bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
        if raw[bom:].lstrip()[:1] == b"[":
            records = _read_array(path, raw, bom, skip_invalid)
            check(bool(records), f"{name} file {path} has no records (an empty JSON array)")
        else:
            records = _read_lines(path, raw, bom, skip_invalid)
            check(bool(records), f"{name} file {path} has no records (only blank lines)")
        return records
    if isinstance(source, list) and source and all(isinstance(r, Record) for r in source):
        return source
    if isinstance(source, Mapping):
        raise FastftError(f"{name} is a mapping with keys {list(source)[:5]} (a DatasetDict?): "
                          f"pass one split, e.g. {name}['train'], or a list of records")
    try:
        rows = list(source)
    except TypeError:
        raise FastftError(f"{name}: give a file path, a list of dicts or a datasets.Dataset; "
                          f"got {type(source).__name__}") from None
    check(bool(rows), f"{name} is empty")
    out = []
    for i, r in enumerate(rows):
        where = f"{name} record {i + 1}"
        if isinstance(r, Mapping):
            out.append(Record(where, dict(r)))
        else:
            out.append(_invalid(f"{where}: a record must be a dict, got {type(r).__name__}",
                                where, skip_invalid))
    return out


def _invalid(message: str, where: str, skip_invalid: bool) -> Record:
    """An unreadable record: an error, or under skip_invalid a Record that says why."""
    if not skip_invalid:
        raise FastftError(message)
    return Record(where, {}, message)


def _not_utf8(where: str, chunk: bytes, offset: int) -> str | None:
    """The message for the first byte of ``chunk`` (at ``offset`` in its file) that is not
    UTF-8, or None."""
    try:
        chunk.decode("utf-8")
        return None
    except UnicodeDecodeError as e:
        return (f"{where}: not UTF-8 text (byte 0x{chunk[e.start]:02x} at byte offset "
                f"{offset + e.start} of the file): save the file as UTF-8, or skip_invalid "
                "(--skip-invalid) to skip such records")


def _read_lines(path: Path, raw: bytes, at: int, skip_invalid: bool) -> list[Record]:
    records = []
    for i, line in enumerate(raw[at:].split(b"\n"), 1):
        start, at = at, at + len(line) + 1
        where = f"{path} line {i}"
        bad = _not_utf8(where, line, start)
        if bad:
            records.append(_invalid(bad, where, skip_invalid))
            continue
        text = line.decode("utf-8")
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            hint = "" if path.suffix in (".jsonl", ".json") else \
                f"; a data file is {KINDS}"
            if i == 1 and _one_object(raw):
                raise FastftError(f"{path}: one JSON object over several lines; JSON Lines "
                                  "(one record a line) or a JSON array of records expected") \
                    from e
            records.append(_invalid(f"{where}: not valid JSON ({e.msg}, column {e.colno})"
                                    f"{hint}", where, skip_invalid))
            continue
        if not isinstance(obj, dict):
            records.append(_invalid(f"{where}: a record must be a JSON object, got "
                                    f"{type(obj).__name__}", where, skip_invalid))
            continue
        records.append(Record(where, obj))
    return records


def _one_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw.decode("utf-8-sig")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def _read_array(path: Path, raw: bytes, at: int, skip_invalid: bool) -> list[Record]:
    """A file holding one JSON array of records (named by record and line)."""
    body = raw[at:]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        if not skip_invalid:
            where = f"{path} line {body.count(NL, 0, e.start) + 1}"
            raise FastftError(_not_utf8(where, body, at)) from None
        text = body.decode("utf-8", "surrogateescape")  # the records that hold it are skipped

    def broken(pos: int, what: str) -> FastftError:
        line = text.count("\n", 0, pos) + 1
        col = pos - text.rfind("\n", 0, pos)
        return FastftError(f"{path} line {line} column {col}: not valid JSON ({what}) in the "
                           "JSON array of records")

    dec, records, line, seen = json.JSONDecoder(), [], 1, 0
    pos = _skip_space(text, text.index("[") + 1)
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                obj, end = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise broken(e.pos, e.msg) from None
            line += text.count("\n", seen, pos)
            seen = pos
            where = f"{path} record {len(records) + 1} (line {line})"
            if not isinstance(obj, dict):
                records.append(_invalid(f"{where}: a record must be a JSON object, got "
                                        f"{type(obj).__name__}", where, skip_invalid))
            elif not _encodable(obj):
                offset = at + len(text[:pos].encode("utf-8", "surrogateescape"))
                chunk = text[pos:end].encode("utf-8", "surrogateescape")
                records.append(_invalid(_not_utf8(where, chunk, offset), where, skip_invalid))
            else:
                records.append(Record(where, obj))
            pos = _skip_space(text, end)
            if text.startswith(",", pos):
                pos = _skip_space(text, pos + 1)
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                raise broken(pos, "',' or ']' expected")
    rest = _skip_space(text, pos)
    if rest < len(text):
        raise broken(rest, "more data after the array; a data file is JSON Lines (one "
                     "record a line) or one JSON array of records")
    return records


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _encodable(obj) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _read_parquet(path: Path, head: bytes) -> list[Record]:
    check(head == b"PAR1", f"{path}: not a Parquet file (it does not begin with the Parquet "
          "magic bytes PAR1)" + ("; it looks like JSON: name it .jsonl or .json"
                                 if head.lstrip()[:1] in (b"{", b"[") else ""))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise FastftError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        why = why.split("': ", 1)[-1] if why.startswith("Could not open") else why
        raise FastftError(f"{path}: a broken or truncated Parquet file ({why}); write it "
                          "again") from e
    return [Record(f"{path} row {i + 1}", r) for i, r in enumerate(rows)]
