"""Text from the store made safe to show: on a terminal, in a file name, in a JSON stream.

Error messages, child ids, payloads, task names and even run ids reach the command line from
user code or from whoever can write the store file. Printed as they are, an escape sequence in
a task's exception clears the screen, retitles the window or hides lines; a lone surrogate (a
file name decoded with ``surrogateescape``) makes the print itself raise. Every human-readable
line the command line writes goes through :func:`printable`; JSON output goes through
:func:`json_text`, which keeps the data exact.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

#: Characters that act on a terminal or cannot be encoded: C0 controls (ESC starts escape
#: sequences, CR rewrites the line), DEL, C1 controls (U+009B is a one-character CSI on some
#: terminals) and lone surrogates, which no UTF-8 stream accepts.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

_ESCAPES: dict[int, str] = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES.update({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"})
_ESCAPES.update({code: f"\\u{code:04x}" for code in range(0xD800, 0xE000)})
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
