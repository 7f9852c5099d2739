"""Flows with a codec, for tests/test_codec.py (importable by name: subprocess attempts and
the codec itself travel to other processes)."""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any

import threadflow
from threadflow import ALL_OVER, Flow, add_children_tasks, task


class TaggedJSON:
    """A codec: JSON with tagged Paths and datetimes (what an app would write)."""

    def dumps(self, value: Any) -> str:
        return json.dumps(value, default=self._tag)

    def loads(self, text: str) -> Any:
        return json.loads(text, object_hook=self._untag)

    @staticmethod
    def _tag(value: Any) -> Any:
        if isinstance(value, pathlib.PurePath):
            return {"$path": str(value)}
        if isinstance(value, datetime.datetime):
            return {"$datetime": value.isoformat()}
        raise TypeError(f"cannot tag {type(value).__name__}")

    @staticmethod
    def _untag(obj: dict[str, Any]) -> Any:
        if "$path" in obj:
            return pathlib.Path(obj["$path"])
        if "$datetime" in obj:
            return datetime.datetime.fromisoformat(obj["$datetime"])
        return obj


CODEC = TaggedJSON()


def list_photos(state: Any) -> dict[str, Any]:
    folder = state["folder"]
    add_children_tasks(((name, folder / name) for name in ("a.jpg", "b.jpg")), state)
    return {"folder": folder, "since": state["since"]}


def thumbnail(child: Any, state: Any) -> pathlib.Path:
    name, path = child
    assert isinstance(path, pathlib.Path)
    if name in state.get("broken", ()) and not state["replayed"]:
        raise ValueError(f"{name} is broken")
    return path.with_suffix(".thumb.jpg")


class Photos(Flow):
    codec = CODEC
    scan = task(task_func=list_photos, child_task_func=thumbnail, task_retry_limit=1, next=ALL_OVER)


class PhotosInProcesses(Flow):
    codec = CODEC
    scan = task(
        task_func=list_photos,
        child_task_func=thumbnail,
        isolation="subprocess",
        task_retry_limit=1,
        next=ALL_OVER,
    )


class NoCodec(Flow):
    scan = task(task_func=list_photos, child_task_func=thumbnail, task_retry_limit=1, next=ALL_OVER)


def results(state: Any) -> dict[Any, Any]:
    return dict(threadflow.results(state, "scan"))
