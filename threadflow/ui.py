"""The live dashboard of ``threadflow ui``: a Datasette plugin, and the server that runs it.

Datasette serves the store file (its own pages browse the tables, with read-only connections)
and this plugin adds the dashboard under :data:`BASE`: the runs list, and a page per run with
its progress, its timeline, its failed attempts and the command that replays it. Each page
polls a JSON route of the plugin every second (:data:`threadflow.dashboard.POLL`) and swaps in
the parts that changed. What the pages show is :mod:`threadflow.dashboard`'s, read from the log
with the readers every command uses; the plugin reads through :class:`EventStore` only, whose
connections are read-only, so a flow can keep writing to the store while the dashboard is open
and the file is never changed by it.

The plugin is registered from Python (:func:`register`, which ``threadflow ui`` calls) rather
than through a package entry point: installing threadflow does not add it to every Datasette.
Needs the ``ui`` extra (``pip install 'threadflow[ui]'``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sqlite3
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote

from datasette import hookimpl as _hookimpl
from datasette.app import Datasette
from datasette.plugins import pm
from datasette.utils.asgi import Response

from ._dashboard_html import (
    SCRIPT,
    error_page,
    run_page,
    run_parts,
    run_url,
    runs_page,
    runs_parts,
    timeline_part,
)
from ._format import json_text
from .dashboard import FOLLOWED, RUNS_SHOWN, Dashboard, RunView
from .errors import StoreError
from .store import RunNotFound, check_readable
from .timeline import Timeline

_F = TypeVar("_F", bound=Callable[..., Any])
#: Datasette's hook marker, typed (Datasette ships no type hints).
hookimpl: Callable[[_F], _F] = _hookimpl

#: Where the dashboard lives in Datasette's URL space.
BASE = "/-/threadflow"
#: The plugin's name in Datasette's plugin manager.
NAME = "threadflow"
#: Every dashboard response forbids what its pages do not need: no inline or foreign script
#: (a string from the log that escaped escaping would still not run), nothing fetched from
#: elsewhere, no framing.
HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}

# The site of each Datasette instance, made on its first request and dropped with it. The only
# state of this module: a Datasette instance is the server, and the dashboard's followers (one
# read-only connection each) must live as long as it does.
_sites: weakref.WeakKeyDictionary[Any, _Site] = weakref.WeakKeyDictionary()
_sites_lock = threading.Lock()


class _Site:
    """The dashboard of the store one Datasette serves, and the charts it has drawn.

    A run's chart is drawn again only when its timeline was rebuilt (its log grew): drawing the
    chart of a big run takes a while (0.15 s for 100,000 children), and every open page of the
    run asks for it every second.
    """

    def __init__(self, path: str, tables: str) -> None:
        self.dashboard = Dashboard(path)
        self.tables = tables  # the URL of Datasette's page of the store's tables
        self._lock = threading.Lock()  # guards _charts
        self._charts: OrderedDict[str, tuple[Timeline, str]] = OrderedDict()

    def chart(self, view: RunView) -> str:
        """The chart of ``view``'s timeline, drawn once per timeline."""
        with self._lock:
            drawn = self._charts.get(view.run_id)
            if drawn is not None and drawn[0] is view.timeline:
                return drawn[1]
        html = timeline_part(view)
        with self._lock:
            self._charts[view.run_id] = (view.timeline, html)
            self._charts.move_to_end(view.run_id)
            while len(self._charts) > FOLLOWED:
                self._charts.popitem(last=False)
        return html

    def run(self, run_id: str) -> tuple[RunView, dict[str, str]]:
        """What run ``run_id``'s page shows now: the model, and the parts drawn from it."""
        view = self.dashboard.run(run_id)
        return view, run_parts(view, self.chart(view))


def register() -> None:
    """Add the plugin to Datasette's plugin manager (once; later calls do nothing)."""
    if pm.get_plugin(NAME) is None:
        pm.register(sys.modules[__name__], name=NAME)


def datasette_for(path: str) -> Any:
    """A Datasette serving the store ``path``, with the plugin registered.

    The file is checked first (:func:`check_readable`: a missing file or another application's
    database is refused, untouched). Datasette opens it as a mutable file: read-only
    connections (``?mode=ro``) that see what a running flow writes.

    :raises StoreError: if ``path`` is not a threadflow store.
    """
    check_readable(path)
    register()
    return Datasette(files=[path])


def close(datasette: Any) -> None:
    """Close what the dashboard and Datasette keep open: their connections, Datasette's
    threads (which hold its connections to its in-memory databases: they go with them)."""
    with _sites_lock:
        site = _sites.pop(datasette, None)
    if site is not None:
        site.dashboard.close()
    for db in datasette.databases.values():
        db.close()
    executor = getattr(datasette, "executor", None)
    if executor is not None:
        executor.shutdown(wait=True)


def _site(datasette: Any) -> _Site | None:
    """The site of the first store Datasette serves; None if it serves none."""
    with _sites_lock:
        site = _sites.get(datasette)
        if site is not None:
            return site
        for name, db in datasette.databases.items():
            path = getattr(db, "path", None)
            if not path or getattr(db, "is_memory", False):
                continue
            try:
                check_readable(path)
            except StoreError:
                continue
            site = _sites[datasette] = _Site(path, datasette.urls.database(name))
            return site
    return None


# -- responses ---------------------------------------------------------------------------------


def _html(body: str, status: int = 200) -> Any:
    return Response(
        body, status=status, headers=dict(HEADERS), content_type="text/html; charset=utf-8"
    )


def _json(value: Any, status: int = 200) -> Any:
    return Response(
        json_text(value),
        status=status,
        headers=dict(HEADERS),
        content_type="application/json; charset=utf-8",
    )


_READ_HINT = "the store could not be read; the page tries again every second"


def _unreadable(exc: Exception) -> str:
    return f"the store could not be read ({exc})"


# -- views -------------------------------------------------------------------------------------


async def home(datasette: Any) -> Any:
    """``/``: the dashboard is the start page of ``threadflow ui``."""
    return Response.redirect(datasette.urls.path(BASE))


async def script() -> Any:
    return Response(SCRIPT, headers=dict(HEADERS), content_type="text/javascript; charset=utf-8")


def _no_store(datasette: Any, api: bool) -> Any:
    message = "no threadflow store is served here"
    hint = "start the dashboard with: threadflow ui --db PATH"
    if api:
        return _json({"error": f"{message}; {hint}"}, 404)
    base = datasette.urls.path(BASE)
    return _html(error_page(base, "-", datasette.urls.path("/"), message, hint), 404)


async def runs_view(datasette: Any) -> Any:
    site = _site(datasette)
    if site is None:
        return _no_store(datasette, api=False)
    dashboard, tables = site.dashboard, site.tables
    base = datasette.urls.path(BASE)
    try:
        lines = await asyncio.to_thread(dashboard.runs)
    except (sqlite3.Error, StoreError) as exc:
        page = error_page(base, dashboard.path, tables, _unreadable(exc), _READ_HINT)
        return _html(page, 503)
    return _html(runs_page(lines, base, dashboard.path, tables, RUNS_SHOWN))


async def runs_json(datasette: Any) -> Any:
    site = _site(datasette)
    if site is None:
        return _no_store(datasette, api=True)
    dashboard = site.dashboard
    try:
        lines = await asyncio.to_thread(dashboard.runs)
    except (sqlite3.Error, StoreError) as exc:
        return _json({"error": _unreadable(exc)}, 503)
    base = datasette.urls.path(BASE)
    return _json(
        {
            "store": dashboard.path,
            "runs": [
                {
                    "run_id": line.run_id,
                    "flow": line.flow,
                    "started": line.started,
                    "url": run_url(base, line.run_id),
                    **_counts(line.progress),
                }
                for line in lines
            ],
            "html": runs_parts(lines, base),
        }
    )


def _counts(progress: Any) -> dict[str, Any]:
    return {
        "status": progress.status,
        "segments": progress.segments,
        "total": progress.total,
        "done": progress.done,
        "failed": progress.failed,
        "running": progress.running,
        "seconds": progress.seconds,
    }


async def _run(datasette: Any, request: Any, api: bool) -> Any:
    site = _site(datasette)
    if site is None:
        return _no_store(datasette, api)
    dashboard, tables = site.dashboard, site.tables
    base = datasette.urls.path(BASE)
    # Datasette routes on the raw path: the run id comes percent-encoded.
    asked = unquote(request.url_vars["run_id"])
    try:
        run_id = await asyncio.to_thread(dashboard.run_id, asked)
        if not api and run_id != asked:  # a prefix: the page of the whole id
            return Response.redirect(run_url(base, run_id))
        # Read and drawn off the event loop: a big run's chart takes a while.
        view, parts = await asyncio.to_thread(site.run, run_id)
    except RunNotFound as exc:
        hint = "give more characters of the run id" if exc.count else "see the runs list"
        if api:
            return _json({"error": f"{exc.message}; {hint}"}, 404)
        return _html(error_page(base, dashboard.path, tables, exc.message, hint), 404)
    except (sqlite3.Error, StoreError) as exc:
        if api:
            return _json({"error": _unreadable(exc)}, 503)
        page = error_page(base, dashboard.path, tables, _unreadable(exc), _READ_HINT)
        return _html(page, 503)
    if not api:
        return _html(run_page(view, parts, base, tables))
    p = view.progress
    return _json(
        {
            "run_id": view.run_id,
            "flow": view.flow,
            **_counts(p),
            "tasks": [
                {
                    "task": t.name,
                    "state": t.state,
                    "total": t.total,
                    "done": t.done,
                    "failed": t.failed,
                    "running": t.running,
                    "attempts": t.attempts,
                }
                for t in p.tasks.values()
            ],
            "failed_attempts": view.failed_attempts,
            "failures": [
                {
                    "seq": f.seq,
                    "ts": f.ts,
                    "kind": f.kind,
                    "task": f.task,
                    "child_id": f.child_id if f.child else None,
                    "child": f.child,
                    "attempt": f.attempt,
                    "error": f.error,
                }
                for f in view.failures
            ],
            "replay": view.replay,
            "html": parts,
        }
    )


async def run_view(datasette: Any, request: Any) -> Any:
    return await _run(datasette, request, api=False)


async def run_json(datasette: Any, request: Any) -> Any:
    return await _run(datasette, request, api=True)


# -- hooks -------------------------------------------------------------------------------------


@hookimpl
def register_routes() -> list[tuple[str, Callable[..., Any]]]:
    """The dashboard's routes (Datasette tries them before its own)."""
    return [
        (r"^/$", home),
        (rf"^{BASE}/?$", runs_view),
        (rf"^{BASE}/api/runs$", runs_json),
        (rf"^{BASE}/run/(?P<run_id>[^/]+)$", run_view),
        (rf"^{BASE}/api/run/(?P<run_id>[^/]+)$", run_json),
        (rf"^{BASE}/dashboard\.js$", script),
    ]


@hookimpl
def menu_links(datasette: Any) -> list[dict[str, str]]:
    """A link to the dashboard in Datasette's own menu."""
    return [{"href": datasette.urls.path(BASE), "label": "threadflow runs"}]


# -- serving -----------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (port 0: any free one).

    :raises OSError: if the address cannot be used (taken, or not this machine's).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url(sock: socket.socket) -> str:
    """The dashboard's address on ``sock``."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        shown = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
    return f"http://{shown}:{port}{BASE}"


def serve(path: str, sock: socket.socket) -> None:
    """Serve the dashboard of the store ``path`` on ``sock`` until Ctrl-C (or SIGTERM).

    :raises StoreError: if ``path`` is not a threadflow store.
    """
    import uvicorn

    datasette = datasette_for(path)
    config = uvicorn.Config(datasette.app(), log_level="warning", access_log=False, lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        close(datasette)
