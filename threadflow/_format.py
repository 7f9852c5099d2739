"""Text for people from the store: the one spelling of durations, times, tasks, errors and
tables that the command line, the live progress and the timeline share, made safe to show.

Error messages, child ids, payloads, task names and even run ids reach the command line from
user code or from whoever can write the store file. Printed as they are, an escape sequence in
a task's exception clears the screen, retitles the window or hides lines; a lone surrogate (a
file name decoded with ``surrogateescape``) makes the print itself raise. Every human-readable
line the command line writes goes through :func:`printable`; JSON output goes through
:func:`json_text`, which keeps the data exact.

Spellings: a duration is ``0.250 s``, ``12.5 s``, ``3m07s`` or ``2h05m``; a cut text ends in
``…``; a time is UTC as stored, ``2024-05-01 12:00:00`` (or with milliseconds); a task is
``fetch`` or ``fetch[3]``.
"""

from __future__ import annotations

import datetime
import hashlib
import html
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

#: Characters that act on a terminal or cannot be encoded: C0 controls (ESC starts escape
#: sequences, CR rewrites the line), DEL, C1 controls (U+009B is a one-character CSI on some
#: terminals) and lone surrogates, which no UTF-8 stream accepts.
#: Also the characters that reorder or hide text (bidirectional overrides and isolates,
#: zero-width characters): a log line must read as it is stored ("Trojan Source").
_INVISIBLE = (
    *range(0x200B, 0x2010),  # zero-width space, joiners, LRM, RLM
    *range(0x202A, 0x202F),  # LRE, RLE, PDF, LRO, RLO
    *range(0x2066, 0x206A),  # LRI, RLI, FSI, PDI
    0xFEFF,  # zero-width no-break space
)
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]"
)

_ESCAPES: dict[int, str] = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES.update({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"})
_ESCAPES.update({code: f"\\u{code:04x}" for code in (*range(0xD800, 0xE000), *_INVISIBLE)})
_ESCAPES_BUT_NEWLINE = {code: text for code, text in _ESCAPES.items() if code != ord("\n")}


def printable(text: str, newlines: bool = False) -> str:
    """``text`` with every unsafe character written as its Python escape (``\\x1b``,
    ``\\n``, ``\\udcff``), so that it shows as text and changes nothing on the terminal.

    Backslashes are left alone: the result is for reading, not for parsing back (use the JSON
    output for that). Applying it twice gives the same text.

    :param newlines: keep line feeds, for text meant to span lines (a traceback); a line is
        still never rewritten, as carriage returns are escaped.
    """
    if _UNSAFE.search(text) is None:
        return text
    return text.translate(_ESCAPES_BUT_NEWLINE if newlines else _ESCAPES)


def html_text(text: Any) -> str:
    """Text from the log as HTML text (element content or a quoted attribute): markup
    escaped, control characters shown as escapes (and a lone surrogate, which cannot be written
    as UTF-8, as ``\\udcff``), lines kept."""
    return html.escape(printable(str(text), newlines=True), quote=True)


#: What ``json.dumps(..., ensure_ascii=False)`` leaves raw: it escapes C0 controls itself.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\ud800-\udfff]")


def json_text(value: Any, indent: int | None = None) -> str:
    """``value`` as JSON that decodes to exactly ``value`` and holds no raw control character.

    Non-ASCII text stays readable; DEL, C1 controls and lone surrogates are written as
    ``\\uXXXX``. They can only occur inside JSON strings, where that escape means the same
    character.
    """
    text = json.dumps(value, indent=indent, ensure_ascii=False, default=repr)
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


#: Characters kept in a file name made from a run id; the rest become ``_``.
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
#: Names Windows refuses for a file whatever its extension.
_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"{p}{n}" for p in ("COM", "LPT") for n in range(1, 10)]
)


def file_stem(name: str, limit: int = 64) -> str:
    """A file name stem for ``name`` (a run id) that stays in the directory it is joined to.

    A run id threadflow made (hex digits) is kept as it is. Anything else, such as a run id
    written into the store by hand (``../../x``), keeps only letters, digits, ``_`` and
    ``-``, and gets a hash of the whole id, so that two ids never share a file.
    """
    stem = _NAME_UNSAFE.sub("_", name).strip("_-")[:limit]
    if stem == name and stem.upper() not in _RESERVED:
        return stem
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{stem}-{digest}" if stem else f"run-{digest}"


# -- values ------------------------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    """``0.250 s``, ``12.5 s``, ``3m07s``, ``2h05m``; ``-`` for None (not ended, unknown)."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.3f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def timestamp(ts: str | None, millis: bool = False) -> str:
    """``2024-05-01 12:00:00`` (UTC, as stored), or with milliseconds; ``-`` for none; a value
    that is not a time is shown as it is."""
    if not ts:
        return "-"
    try:
        parsed = datetime.datetime.fromisoformat(ts)
    except (TypeError, ValueError):
        return ts
    text = parsed.strftime("%Y-%m-%d %H:%M:%S")
    return f"{text}.{parsed.microsecond // 1000:03d}" if millis else text


def shorten(text: str, width: int) -> str:
    """One printable line of at most ``width`` characters (runs of white space become one),
    cut with ``…``."""
    text = printable(" ".join(text.split()))
    return text if len(text) <= width else text[: width - 1] + "…"


def plain(value: Any) -> Any:
    """Tuples (child ids, task tuples) as JSON lists."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value


def compact(value: Any) -> str:
    """Compact JSON of a value from the log (a child id, a payload, a result)."""
    return json.dumps(plain(value), separators=(",", ":"), ensure_ascii=False, default=repr)


def error_text(error: Any) -> str:
    """``Type: message`` of a stored error (or of an exception)."""
    if isinstance(error, dict):
        kind, message = error.get("type"), error.get("message")
        return f"{kind}: {message}" if kind else str(message)
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return "" if error is None else str(error)


def task_text(task: Any) -> str:
    """``split`` or ``split[2]`` for a task tuple or list (from a result or the log)."""
    if not task:
        return "-"
    name, *child = task
    return f"{name}[{compact(child[0])}]" if child else str(name)


def plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


# -- tables ------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: str = "") -> list[str]:
    """Plain aligned columns; columns whose index is in ``right`` are right-aligned.

    Cells are made printable before they are measured, so the columns line up as shown.
    """
    cells = [[printable(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    return [line(headers, widths, right)] + [line(row, widths, right) for row in cells]


def line(cells: Sequence[str], widths: Sequence[int], right: str) -> str:
    """One row of :func:`table`, its cells padded to ``widths``."""
    parts = [
        cell.rjust(w) if str(i) in right else cell.ljust(w)
        for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
    ]
    return "  ".join(parts).rstrip()


# -- events ------------------------------------------------------------------------------------


def event_summary(kind: str, data: Any, width: int) -> str:
    """A one-line digest of an event's data, at most ``width`` characters: the error, the
    result, the counts."""
    data = data if isinstance(data, dict) else {}
    if kind == "flow_started":
        text = f"flow={data.get('flow')} entrance={data.get('entrance')}"
    elif kind == "child_added":
        text = f"payload={compact(data.get('payload'))}"
    elif kind in ("task_over", "task_ran"):
        text = f"result={compact(data['result'])}" if "result" in data else ""
    elif kind in ("exit", "timeout", "task_failed"):
        text = error_text(data.get("error"))
        if data.get("tolerated"):
            text += " (tolerated)"
    elif kind == "failed_over":
        text = f"{task_text(data.get('task'))}: {error_text(data.get('error'))}"
    elif kind in ("cancelled", "interrupted") and data.get("reason"):
        text = f"reason={data['reason']}"
        if data.get("error"):
            text += f" {error_text(data['error'])}"
    elif kind == "all_over":
        failed = data.get("failed") or []
        text = f"tolerated failures: {len(failed)}" if failed else ""
    elif kind == "retry":
        text = f"next attempt {data.get('next_attempt')} in {data.get('delay', 0):g} s"
    elif kind == "task_all_over":
        text = f"done={data.get('done')} failed={data.get('failed')}"
    elif kind == "replayed":
        text = f"segment {data.get('segment')} (after {data.get('previous_outcome')})"
        if isinstance(data.get("rerun"), list):
            text += f" rerun: {', '.join(map(str, data['rerun']))}"
    elif kind == "callback_error":
        text = f"{data.get('signal')} {data.get('receiver')}: {error_text(data.get('error'))}"
    else:
        text = " ".join(f"{k}={compact(v)}" for k, v in data.items())
    return shorten(text, width)
