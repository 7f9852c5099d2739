"""Fingerprints of task functions: what lets a replay notice that the code changed.

A fingerprint is a short hash of what a function *does*, not of how its text looks: the
syntax tree of its source, with formatting, comments, docstrings and line numbers left out.
So reformatting a module or editing a comment is not a change; editing an expression is.

* ``src:`` + 16 hex digits: the SHA-256 of the function's syntax tree, written out by
  :func:`_canon` (not ``ast.dump``, whose text differs between Python versions: 3.12 added
  ``type_params`` fields, 3.13 leaves out empty ones). The same source gives the same
  fingerprint on Python 3.10 to 3.13.
* ``code:`` + 16 hex digits: when the source cannot be read (a function made by ``exec``, a
  module shipped without its ``.py``), the hash of its code object: bytecode, constants
  (nested code objects included) and names. Bytecode changes between Python versions, so such
  a fingerprint may differ when the interpreter does; fingerprints of different kinds are
  never compared.
* None: nothing to fingerprint (a builtin, a C function). Such a function counts as unchanged.

Fingerprinting never raises: whatever goes wrong gives None, so it can never fail a run.

This module uses only the standard library, so that it can be loaded on its own.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import textwrap
import types
from typing import Any

#: The prefixes of the two kinds of fingerprint.
SOURCE = "src:"
CODE = "code:"

# Fields of the syntax tree that hold no meaning: where a node is, and type comments.
_SKIP_FIELDS = frozenset({"type_comment", "ctx"})
# Plain constants a functools.partial's arguments may be compared by.
_PLAIN = (str, int, float, bool, bytes, type(None))


def fingerprint(func: Any) -> str | None:
    """The fingerprint of a task function (see the module's docstring); None when it has none.

    Follows bound methods to their function, ``functools.partial`` to its function (and its
    arguments, when they are plain constants), and a callable object to its class's source.
    """
    try:
        return _fingerprint(func, 0)
    except Exception:  # a hostile object (a __getattr__ that raises...) gets no fingerprint
        return None


def _fingerprint(func: Any, depth: int) -> str | None:
    if func is None or depth > 5:
        return None
    if isinstance(func, functools.partial):
        inner = _fingerprint(func.func, depth + 1)
        args = _plain((func.args, sorted(func.keywords.items())))
        if inner is None or args is None:
            return inner
        return _kind(inner) + ":" + _digest(inner + "|" + args)
    if isinstance(func, types.MethodType):
        func = func.__func__
    if isinstance(func, (types.FunctionType, type)):
        return _of_source(func) or _of_code(getattr(func, "__code__", None))
    if isinstance(func, (types.BuiltinFunctionType, types.MethodWrapperType)):
        return None
    call = inspect.getattr_static(type(func), "__call__", None)
    if isinstance(call, types.FunctionType):  # a callable object: its class says what it does
        # (The class's source is found through its module in sys.modules; failing that, the
        # source of its __call__, found through the code's file.)
        return _of_source(type(func)) or _of_source(call) or _of_code(call.__code__)
    return None


def _plain(value: Any) -> str | None:
    """``repr`` of plain constants (and tuples and lists of them), else None: the repr of
    other objects may hold an address, which changes from run to run."""
    if isinstance(value, _PLAIN):
        return repr(value)
    if isinstance(value, (tuple, list)):
        parts = [_plain(v) for v in value]
        if None in parts:
            return None
        text = ",".join(p for p in parts if p is not None)  # (all are: for the type checker)
        return f"({text})" if isinstance(value, tuple) else f"[{text}]"
    return None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _of_source(obj: Any) -> str | None:
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):
        return None
    is_lambda = getattr(obj, "__name__", None) == "<lambda>"
    tree: ast.Module | None
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        # A lambda's lines are those of the statement around it, maybe cut in the middle of
        # a call: try the lambda alone. Anything else that does not parse: no source
        # fingerprint (its code object's is taken).
        tree = _lambda_tree(source) if is_lambda else None
    if tree is None:
        return None
    node: ast.AST = tree
    if is_lambda:
        lambdas = [n for n in ast.walk(tree) if isinstance(n, ast.Lambda)]
        if len(lambdas) != 1:  # several lambdas on its lines: which one is not known
            return None
        node = lambdas[0]
    elif len(tree.body) == 1:
        node = tree.body[0]
    return SOURCE + _digest(_canon(node))


def _lambda_tree(source: str) -> ast.Module | None:
    start = source.find("lambda")
    text = source[start:].strip() if start >= 0 else ""
    if len(text) > 2000:  # cutting it one character at a time would take too long
        return None
    # Cut trailing text (closing brackets, other arguments) until it parses.
    while text:
        try:
            return ast.parse(text, mode="exec")
        except SyntaxError:
            text = text[:-1].rstrip()
    return None


def _canon(node: Any) -> str:
    """The syntax tree as text, the same on every Python from 3.10: fields that are None or
    empty are left out (3.12 added empty ``type_params``; 3.13's ``ast.dump`` drops them), and
    so are positions, type comments and the load/store context; docstrings are not code."""
    if isinstance(node, ast.AST):
        fields = []
        body = _without_docstring(node)
        for name in node._fields:
            if name in _SKIP_FIELDS:
                continue
            value = body if name == "body" and body is not None else getattr(node, name, None)
            if value is None or value == []:
                continue
            fields.append(f"{name}={_canon(value)}")
        return f"{type(node).__name__}({','.join(fields)})"
    if isinstance(node, list):
        return "[" + ",".join(_canon(v) for v in node) + "]"
    return repr(node)


def _without_docstring(node: ast.AST) -> list[Any] | None:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return None
    body = list(node.body)
    first = body[0] if body else None
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        body = body[1:]
    return body


def _of_code(code: Any) -> str | None:
    if not isinstance(code, types.CodeType):
        return None
    return CODE + _digest(_code_text(code))


def _code_text(code: types.CodeType) -> str:
    consts = ",".join(_const_text(c) for c in code.co_consts)
    return f"{code.co_code.hex()}|{consts}|{code.co_names}"


def _const_text(value: Any) -> str:
    if isinstance(value, types.CodeType):
        return _code_text(value)
    if isinstance(value, tuple):
        return "(" + ",".join(_const_text(v) for v in value) + ")"
    if isinstance(value, frozenset):  # its order follows string hashing, which is per process
        return "frozenset(" + ",".join(sorted(_const_text(v) for v in value)) + ")"
    return repr(value)


def task_fingerprints(tasks: Any) -> dict[str, dict[str, str | None]]:
    """``{task: {"task_func": fp, "child_task_func": fp}}`` for a flow's tasks (``TaskSpec``):
    what ``flow_started`` and ``replayed`` record. Never raises."""
    found: dict[str, dict[str, str | None]] = {}
    for name, spec in tasks.items():
        found[name] = {
            "task_func": fingerprint(getattr(spec, "task_func", None)),
            "child_task_func": fingerprint(getattr(spec, "child_task_func", None)),
        }
    return found


def _kind(fp: str) -> str:
    """``src`` or ``code``: how a fingerprint was taken (two kinds never compare)."""
    return fp.split(":", 1)[0]


def differs(before: object, now: str | None) -> bool:
    """Whether a function changed: a fingerprint on both sides, of one kind, not equal."""
    return (
        isinstance(before, str)
        and now is not None
        and _kind(before) == _kind(now)
        and (before != now)
    )


def compare(
    recorded: dict[str, Any] | None, now: dict[str, dict[str, str | None]]
) -> dict[str, str]:
    """Per task, ``"unchanged"``, ``"changed"``, ``"added"`` or ``"removed"``: the code now
    (``now``) against the fingerprints a log recorded; empty when it recorded none (a log
    written before fingerprints were). A function either side has no fingerprint for, or
    fingerprints of two kinds (``src:`` and ``code:``), cannot be compared: unchanged."""
    if not isinstance(recorded, dict):
        return {}
    verdict: dict[str, str] = {}
    for name, functions in now.items():
        old = recorded.get(name)
        if not isinstance(old, dict):
            verdict[name] = "added"
            continue
        changed = any(differs(old.get(key), fp) for key, fp in functions.items())
        verdict[name] = "changed" if changed else "unchanged"
    for name in recorded:
        if name not in now:
            verdict[name] = "removed"
    return verdict
