"""Helpers both record decoders share: strict JSON, RFC 3339 times, number matrices, headers.

Every helper here reports a problem by *returning* a short reason a human can
act on (``"input: element 3 is a string, expected a number"``) instead of
raising, because a decoder must turn a bad record into a dead letter and carry
on with the next one. Exceptions are for bugs, not for bad input.

The speed-critical idea is in :func:`rows_to_matrix`: per record we only collect
Python lists, and one ``np.array`` call per batch converts them all; the slow,
per-row checks run only when that fast conversion shows a problem.
"""

from __future__ import annotations

import calendar
import json
import math
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np

from agent.records import RawRecord

# Python's json accepts the non-standard literals NaN, Infinity and -Infinity;
# a monitor must not, because a NaN in an input row would poison every running
# statistic it touches. ``parse_constant`` is only called for those literals.


class NonFiniteLiteralError(ValueError):
    """Raised inside the JSON scanner when it meets NaN, Infinity or -Infinity."""


def _reject_constant(literal: str) -> Any:
    raise NonFiniteLiteralError(literal)


_STRICT_JSON = json.JSONDecoder(parse_constant=_reject_constant)


def parse_json(raw: bytes) -> tuple[Any, str | None]:
    """Decode a UTF-8 JSON document strictly; ``(value, None)`` or ``(None, reason)``.

    Strict means: UTF-8 only (``json.loads`` on bytes would also guess UTF-16/32),
    and no NaN/Infinity literals.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"not UTF-8: {err.reason} at byte {err.start}"
    try:
        return _STRICT_JSON.decode(text), None
    except NonFiniteLiteralError as err:
        return None, f"not JSON: {err.args[0]} is not a JSON number (send finite numbers only)"
    except json.JSONDecodeError as err:
        return None, f"not JSON: {err.msg} at line {err.lineno} column {err.colno}"
    except RecursionError:
        return None, "not JSON: nested too deeply"


def check_size(record: RawRecord, max_record_bytes: int) -> str | None:
    """The reason a record's value cannot be decoded at all (tombstone, too big), or None."""
    value = record.value
    if value is None:
        return "tombstone (null value): nothing to decode"
    if len(value) > max_record_bytes:
        return f"too big: record is {len(value)} bytes, over max_record_bytes={max_record_bytes}"
    if not value:
        return "empty value: expected a JSON object"
    return None


def type_name(value: Any) -> str:
    """JSON's name for a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "a number"


# RFC 3339 section 5.6 date-time. Lower-case t/z and a space separator are
# allowed by the RFC's notes; Go (KServe, CloudEvents SDK) writes up to 9
# fractional digits, which datetime.fromisoformat would silently truncate.
_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:([Zz])|([+-])(\d{2}):(\d{2}))")


def parse_rfc3339(text: str) -> float | None:
    """Epoch seconds of an RFC 3339 date-time, or None when it is not one."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    try:
        # validates day-of-month and ranges; a leap second (60) is clamped for the check only
        datetime(year, month, day, hour, minute, min(second, 59))
    except ValueError:
        return None
    if second > 60:
        return None
    epoch = float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))
    if match.group(7):
        epoch += float("0" + match.group(7))
    if match.group(9):
        offset_h, offset_m = int(match.group(10)), int(match.group(11))
        if offset_h > 23 or offset_m > 59:
            return None
        offset = offset_h * 3600 + offset_m * 60
        epoch -= offset if match.group(9) == "+" else -offset
    return epoch


def parse_ts(value: Any) -> float | str:
    """A record's ``ts`` as float epoch seconds, or the reason it is not usable.

    Accepted: a JSON number (epoch seconds) or an RFC 3339 string with a time zone.
    """
    kind = type(value)
    if kind is float or kind is int:
        if not math.isfinite(value):
            return "ts: not a finite number"
        return float(value)
    if kind is str:
        parsed = parse_rfc3339(value)
        if parsed is None:
            return f"ts: {value[:40]!r} is not RFC 3339 (e.g. 2025-11-23T06:00:00.25Z) nor epoch seconds"
        return parsed
    if value is None:
        return "ts: missing; expected epoch seconds or an RFC 3339 string"
    return f"ts: expected epoch seconds or an RFC 3339 string, got {type_name(value)}"


def flatten_numbers(value: Any, field: str, allow_bool: bool = False) -> list[float | int] | str:
    """Flatten a (possibly nested, rectangular) JSON array of numbers row-major.

    The slow path: used for nested inputs and to explain why a row failed the
    fast batch conversion. Returns the flat list or a reason.
    """
    if not isinstance(value, list):
        return f"{field}: expected an array of numbers, got {type_name(value)}"
    flat: list[float | int] = []
    # iterative depth-first walk: a hostile deep nesting cannot blow the stack
    shape_at_depth: dict[int, int] = {}
    stack: list[tuple[list[Any], int, int]] = [(value, 0, 0)]
    leaf_depth: int | None = None
    while stack:
        items, pos, depth = stack.pop()
        if pos == 0:
            expected = shape_at_depth.setdefault(depth, len(items))
            if len(items) != expected:
                return f"{field}: nested arrays have unequal lengths ({expected} and {len(items)})"
        while pos < len(items):
            item = items[pos]
            pos += 1
            kind = type(item)
            if kind is list:
                if leaf_depth is not None and depth + 1 > leaf_depth:
                    return f"{field}: nested arrays have unequal depths"
                stack.append((items, pos, depth))
                stack.append((item, 0, depth + 1))
                break
            if leaf_depth is None:
                leaf_depth = depth
            elif depth != leaf_depth:
                return f"{field}: nested arrays have unequal depths"
            if kind is float or kind is int or (allow_bool and kind is bool):
                flat.append(item)
            else:
                return f"{field}: element {len(flat)} is {type_name(item)}, expected a number"
    return flat


def row_problem(row: Any, field: str, allow_bool: bool = False) -> str:
    """Why one row failed the batch conversion (the fast path only knows that one did)."""
    if not isinstance(row, list):
        return f"{field}: expected an array of numbers, got {type_name(row)}"
    for index, item in enumerate(row):
        kind = type(item)
        if not (kind is float or kind is int or (allow_bool and kind is bool)):
            return f"{field}: element {index} is {type_name(item)}, expected a number"
    try:
        values = np.array(row, dtype=np.float64)
    except OverflowError:
        return f"{field}: an element is beyond float32 range"
    with np.errstate(over="ignore"):
        narrow = values.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(narrow))
    if bad.size:
        return f"{field}: element {int(bad[0])} is {float(values[bad[0]])!r}, beyond float32 range"
    return f"{field}: cannot be converted to float32"


def rows_to_matrix(
    rows: Sequence[list[Any]], width: int, field: str, allow_bool: bool = False
) -> tuple[np.ndarray, dict[int, str]]:
    """Convert equal-length rows of JSON numbers to float32 ``[n, width]`` in one call.

    Returns the matrix and ``{row index: reason}`` for rows that are not all
    finite numbers (those rows are zero in the matrix; the caller drops them).
    Every row must already have ``len(row) == width``.
    """
    n = len(rows)
    if n == 0:
        return np.zeros((0, width), np.float32), {}
    bad: dict[int, str] = {}
    try:
        wide = np.array(rows)
        ok_kinds = "fiub" if allow_bool else "fiu"
        fast_ok = wide.ndim == 2 and wide.dtype.kind in ok_kinds and wide.shape == (n, width)
    except (ValueError, TypeError, OverflowError):
        fast_ok = False
    if not fast_ok:
        # slow path: convert row by row to find the culprits
        matrix = np.zeros((n, width), np.float32)
        for index, row in enumerate(rows):
            try:
                converted = np.array(row)
                if converted.ndim != 1 or converted.dtype.kind not in ("fiub" if allow_bool else "fiu"):
                    raise ValueError("not numbers")
                with np.errstate(over="ignore"):
                    matrix[index] = converted.astype(np.float32)
            except (ValueError, TypeError, OverflowError):
                bad[index] = row_problem(row, field, allow_bool)
        wide = matrix
    with np.errstate(over="ignore", invalid="ignore"):
        matrix = wide.astype(np.float32, copy=False)
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        for index in np.flatnonzero(~finite).tolist():
            if index not in bad:
                bad[index] = row_problem(rows[index], field, allow_bool)
        matrix = matrix.copy() if matrix is wide else matrix
        matrix[~finite] = 0.0
    return matrix, bad


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 for stability, returned as float32."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def parse_traceparent(value: bytes | str | None) -> str | None:
    """A W3C traceparent header value if it is well-formed, else None.

    A malformed trace header must not cost us the event, so it is dropped, not
    dead-lettered.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    value = value.strip()
    if _TRACEPARENT.fullmatch(value) is None or value.startswith("ff"):
        return None
    return value


def header_text(record: RawRecord, name: str) -> str | None:
    """The last header ``name`` as text (UTF-8, undecodable bytes replaced), or None."""
    value = record.header(name)
    if value is None:
        return None
    return value.decode("utf-8", errors="replace")


def split_json_prefix(raw: bytes) -> tuple[Any, bytes] | str:
    """A JSON document followed by raw bytes (OIP's binary tensor data extension): (value, rest) or a reason.

    The JSON part is located on a Latin-1 view of the bytes, where one character
    is one byte, so the end index found is a byte offset; the part is then
    decoded strictly as UTF-8 like any other document.
    """
    text = raw.decode("latin-1")
    start = len(text) - len(text.lstrip())
    try:
        _, end = _STRICT_JSON.raw_decode(text, start)
    except NonFiniteLiteralError as err:
        return f"not JSON: {err.args[0]} is not a JSON number (send finite numbers only)"
    except json.JSONDecodeError as err:
        return f"not JSON: {err.msg} at line {err.lineno} column {err.colno}"
    except RecursionError:
        return "not JSON: nested too deeply"
    value, reason = parse_json(raw[:end])
    if reason is not None:
        return reason
    return value, raw[end:]
