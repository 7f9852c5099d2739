"""A flow's graph as text: a Mermaid flowchart or Graphviz DOT (``threadflow graph``).

One node per task, an edge per ``next``, an ``entrance`` node pointing at the default entrance,
an ``all_over`` node where branches end; a task with children is drawn as a double box. Any task
name makes a valid node: ids and labels are escaped for each language.
"""

from __future__ import annotations

import json
import re

from .definition import ALL_OVER, FlowDefinition

#: Words Mermaid reads as syntax when used as a node id.
_MERMAID_WORDS = frozenset(
    "end graph flowchart subgraph direction class classdef click style linkstyle call "
    "default".split()
)


def _node_ids(definition: FlowDefinition, mermaid: bool) -> tuple[dict[str, str], str, str]:
    """Node ids of the tasks, the entrance marker and the end node, all distinct.

    DOT quotes its ids, so a task's id is its name. Mermaid's ids are bare words: a name that
    is not one becomes letters, digits and ``_`` (its label keeps the name), and a name Mermaid
    reads as a keyword gets a trailing ``_``.
    """
    taken: set[str] = set()

    def unique(name: str) -> str:
        candidate = (_MERMAID_ID_UNSAFE.sub("_", name) or "task") if mermaid else name
        while candidate in taken or (mermaid and candidate.lower() in _MERMAID_WORDS):
            candidate += "_"
        taken.add(candidate)
        return candidate

    ids = {name: unique(name) for name in definition.tasks}
    return ids, unique("entrance"), unique(ALL_OVER)


_MERMAID_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
#: Characters a Mermaid label shows as they are; every other one is written as an entity code.
_MERMAID_LABEL_SAFE = frozenset(" _-.,:/+=@!?'()")


def _mermaid_label(text: str) -> str:
    """``text`` as a quoted Mermaid label: quotes, brackets, ``#``, ``<``, line breaks and
    control characters become entity codes (``#34;``), which Mermaid draws as the character,
    so no task name can end the label or the statement."""
    body = "".join(
        c if (c.isalnum() and c.isprintable()) or c in _MERMAID_LABEL_SAFE else f"#{ord(c)};"
        for c in text
    )
    return f'"{body}"'


def mermaid(definition: FlowDefinition) -> list[str]:
    ids, entrance, end = _node_ids(definition, mermaid=True)
    lines = ["flowchart TD", f"    {entrance}((entrance))"]
    for name, spec in definition.tasks.items():
        if spec.child_task_func is not None:
            lines.append(f"    {ids[name]}[[{_mermaid_label(f'{name} (children)')}]]")
        else:
            lines.append(f"    {ids[name]}[{_mermaid_label(name)}]")
    lines.append(f"    {end}([{ALL_OVER}])")
    lines.append(f"    {entrance} --> {ids[definition.default_entrance]}")
    for name, spec in definition.tasks.items():
        for target in spec.successors or (ALL_OVER,):
            lines.append(f"    {ids[name]} --> {end if target == ALL_OVER else ids[target]}")
    return lines


def _dot_id(name: str) -> str:
    return json.dumps(name)


def dot(definition: FlowDefinition) -> list[str]:
    ids, entrance, end = _node_ids(definition, mermaid=False)
    lines = [
        f"digraph {_dot_id(definition.name)} {{",
        "    rankdir=TB;",
        "    node [shape=box];",
        f'    {_dot_id(entrance)} [shape=circle, label="entrance"];',
    ]
    for name, spec in definition.tasks.items():
        if spec.child_task_func is not None:
            label = _dot_id(f"{name} (children)")
            lines.append(f"    {_dot_id(ids[name])} [peripheries=2, label={label}];")
        else:
            lines.append(f"    {_dot_id(ids[name])};")
    lines.append(f'    {_dot_id(end)} [shape=doublecircle, label="{ALL_OVER}"];')
    lines.append(f"    {_dot_id(entrance)} -> {_dot_id(ids[definition.default_entrance])};")
    for name, spec in definition.tasks.items():
        for target in spec.successors or (ALL_OVER,):
            dest = end if target == ALL_OVER else ids[target]
            lines.append(f"    {_dot_id(ids[name])} -> {_dot_id(dest)};")
    lines.append("}")
    return lines
