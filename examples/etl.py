"""A threadflow example: fetch a batch of records over HTTP, parse pages in parallel, store rows.

It starts a tiny HTTP server on 127.0.0.1 that serves pages of sensor readings, and makes it
misbehave the way real services do: some requests fail once with 503, one page hangs once past
the timeout, and one page is malformed for good. The flow:

* ``fetch``   reads the index of pages and adds one child per page;
* ``fetch``'s children (``parse_page``) download and parse their page, at most 4 at once, with
  3 attempts and a 1 s timeout each; a malformed page is tolerated (``exit_on_failed=False``);
* ``store``   writes the parsed rows into a ``readings`` table and prints a summary.

Every step is in the event log (the default store, ``threadflow.db``, or ``$THREADFLOW_DB``).
Run it: ``python examples/etl.py``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import urllib.error
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import threadflow
from threadflow import ALL_OVER, Flow, add_children_tasks, results, task

PAGES = 20
ROWS_PER_PAGE = 25


class FlakyRecords(BaseHTTPRequestHandler):
    """Serves ``/index`` and ``/page/N``; fails like a real service, deterministically."""

    seen: Counter[str] = Counter()
    release = threading.Event()  # set at shutdown, frees the request that hangs

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen[self.path] += 1
        first = self.seen[self.path] == 1
        if self.path == "/index":
            return self._send(200, {"pages": [f"/page/{n}" for n in range(PAGES)]})
        page = int(self.path.rsplit("/", 1)[1])
        if page % 7 == 3 and first:
            return self._send(503, {"error": "busy, try again"})
        if page == 11 and first:
            self.release.wait(5)  # longer than the task timeout: the attempt is cancelled
        if page == 13:
            body = b"sensor,reading\nthermo-13,not-a-number\n"
            return self._raw(200, body)
        rows = [
            {"sensor": f"s{page}-{i}", "value": round(page + i * 0.1, 2)}
            for i in range(ROWS_PER_PAGE)
        ]
        return self._send(200, {"rows": rows})

    def _send(self, status: int, obj: Any) -> None:
        self._raw(status, json.dumps(obj).encode())

    def _raw(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (timed out): nothing to do
            pass

    def log_message(self, *args: Any) -> None:  # keep the example's output readable
        pass


def get_json(url: str, timeout: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


# -- the task functions: plain module-level functions of (state) and (child, state) ---------


def fetch(state: Any) -> int:
    index = get_json(state["base_url"] + "/index", timeout=2)
    add_children_tasks(((path, state["base_url"] + path) for path in index["pages"]), state)
    return len(index["pages"])


def parse_page(child: tuple[str, str], state: Any) -> list[dict[str, Any]]:
    _path, url = child
    # The token's remaining patience bounds the HTTP wait; a timed-out attempt is cancelled.
    threadflow.current_token().raise_if_cancelled()
    try:
        page = get_json(url, timeout=1.5)
    except urllib.error.HTTPError as exc:
        raise ConnectionError(f"{url}: HTTP {exc.code}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{url}: malformed page ({exc})") from exc
    return page["rows"]


def store(state: Any) -> int:
    db = sqlite3.connect(state["output"])
    with db:
        db.execute("CREATE TABLE IF NOT EXISTS readings (run_id TEXT, sensor TEXT, value REAL)")
        db.execute("DELETE FROM readings WHERE run_id = ?", (state["run_id"],))
        count = 0
        for _page, rows in results(state, "fetch"):
            db.executemany(
                "INSERT INTO readings VALUES (?, ?, ?)",
                [(state["run_id"], r["sensor"], r["value"]) for r in rows],
            )
            count += len(rows)
    db.close()
    return count


class Import(Flow, server_name="example-import"):
    """fetch -> (parse each page, 4 at a time) -> store."""

    default_entrance = "fetch"
    fetch = task(
        task_func=fetch,
        child_task_func=parse_page,
        max_concurrency=4,
        task_retry_limit=3,
        task_timeout=1.0,
        task_retry_delay=lambda failed_attempt: 0.1 * failed_attempt,
        retry_on=(ConnectionError, TimeoutError, ValueError),
        exit_on_failed=False,
        next="store",
    )
    store = task(task_func=store, next=ALL_OVER)

    def handle_task_timeout(self, task: tuple[Any, ...], state: dict[str, Any]) -> None:
        print(f"  timeout: {task} (will retry)")

    def handle_task_failed(self, task: tuple[Any, ...], state: dict[str, Any]) -> None:
        print(f"  gave up: {task}")


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyRecords)
    threading.Thread(target=server.serve_forever, name="example-http", daemon=True).start()
    base_url = f"http://127.0.0.1:{server.server_address[1]}"
    output = "example-output.db"
    print(f"serving {PAGES} pages of records at {base_url}")
    try:
        result = Import.run(base_url=base_url, output=output)
    finally:
        FlakyRecords.release.set()
        server.shutdown()

    store_path = result.state["store"].path
    events = threadflow.EventStore(store_path).events(result.run_id)
    kinds = Counter(e.kind for e in events)
    pages = list(results(result.state, "fetch"))
    rows = sum(len(r) for _, r in pages)
    print()
    print(f"run {result.run_id}: {result.outcome}")
    print(f"  pages parsed:   {len(pages)} of {PAGES}")
    print(f"  rows written:   {rows} into {output} (table readings)")
    print(f"  retries:        {kinds['retry']} ({kinds['timeout']} after a timeout)")
    print(f"  failed pages:   {[t[1] for t in result.failed]} (tolerated)")
    print(f"  event log:      {store_path} ({len(events)} events in this run)")
    print(
        f'  look inside:    sqlite-utils {store_path} --table "SELECT kind, count(*) FROM events '
        f"WHERE run_id = '{result.run_id}' GROUP BY kind\""
    )


if __name__ == "__main__":
    main()
