"""Regenerate the timeline picture of the docs from a real run.

    python tools/make_timeline_picture.py [--png docs/img/timeline.png] [--html PATH]
                                          [--db PATH] [--browser chromium]

It runs the flow below (a nightly import whose pages fail once, time out, ignore their cancel,
are malformed for good, and whose load stage fails the run) into a fresh store, draws the run
with ``threadflow timeline``, and photographs the page with a headless Chromium or Chrome
(``--browser``, else the first of chromium, chromium-browser, google-chrome on the PATH).
Without a browser it still writes the HTML and says so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import threadflow
from threadflow import ALL_OVER, Flow, add_children_tasks, task

ROOT = Path(__file__).resolve().parent.parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_tries: Counter[tuple[str, int]] = Counter()
_lock = threading.Lock()


def _attempt(kind: str, child_id: int) -> int:
    with _lock:
        _tries[(kind, child_id)] += 1
        return _tries[(kind, child_id)]


def list_pages(state: Any) -> None:
    threadflow.sleep(0.15)
    add_children_tasks(((page, {"url": f"/page/{page}"}) for page in range(1, 11)), state)


def download_page(child: Any, state: Any) -> int:
    page, _payload = child
    attempt = _attempt("page", page)
    if page == 3 and attempt == 1:
        threadflow.sleep(0.1)
        raise ConnectionError(f"HTTP 503 from /page/{page}: busy, try again")
    if page == 5 and attempt == 1:
        threadflow.sleep(5)  # hangs past the timeout; the cancel wakes it at once
    if page == 7 and attempt == 1:
        time.sleep(1.1)  # ignores its cancel token: timed out, then abandoned
    if page == 9:
        threadflow.sleep(0.12)
        raise ValueError(f"/page/{page}: malformed CSV, line 2: 'not-a-number'")
    threadflow.sleep(0.2 + (page % 4) * 0.07)
    return 25


def list_batches(state: Any) -> None:
    threadflow.sleep(0.1)
    add_children_tasks(((batch, {"rows": 50}) for batch in range(1, 7)), state)


def load_batch(child: Any, state: Any) -> int:
    batch, payload = child
    threadflow.sleep(0.7 if batch == 6 else 0.22 + (batch % 3) * 0.06)
    if batch == 4:
        raise sqlite3.IntegrityError("UNIQUE constraint failed: readings.sensor, readings.ts")
    return int(payload["rows"])


def report(state: Any) -> None:
    return None


class NightlyImport(Flow):
    """download pages (tolerant, retried, timed out) -> load batches (fatal) -> report."""

    abandon_grace = 0.25
    download = task(
        task_func=list_pages,
        child_task_func=download_page,
        max_concurrency=4,
        task_retry_limit=3,
        task_timeout=0.6,
        task_retry_delay=0.2,
        exit_on_failed=False,
        next="load",
    )
    load = task(
        task_func=list_batches,
        child_task_func=load_batch,
        max_concurrency=3,
        task_retry_limit=2,
        task_timeout=1.0,
        next="report",
    )
    report = task(task_func=report, next=ALL_OVER)


def find_browser(name: str | None) -> str | None:
    if name:
        return shutil.which(name) or name
    for candidate in BROWSERS:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def screenshot(browser: str, html: Path, png: Path, size: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--screenshot={png}",
                f"--window-size={size}",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                f"--user-data-dir={profile}",
                html.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--png", default=str(ROOT / "docs" / "img" / "timeline.png"))
    parser.add_argument("--html", help="where to keep the HTML page (default: a temporary file)")
    parser.add_argument("--db", help="the store to run in (default: a temporary file)")
    parser.add_argument("--browser", help="Chromium or Chrome executable")
    parser.add_argument("--size", default="1200,780", help="window size WIDTH,HEIGHT")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or os.path.join(tmp, "runs.db")
        html = Path(args.html or os.path.join(tmp, "timeline.html"))
        result = NightlyImport.run(store=db)
        print(f"run {result.run_id}: {result.outcome}", file=sys.stderr)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "threadflow",
                "timeline",
                result.run_id,
                "--db",
                db,
                "-o",
                str(html),
            ],
            check=True,
            cwd=ROOT,
        )
        browser = find_browser(args.browser)
        if browser is None:
            print(
                "no Chromium or Chrome found: pass --browser; the HTML is not kept unless "
                "--html is given",
                file=sys.stderr,
            )
            return 1
        png = Path(args.png)
        png.parent.mkdir(parents=True, exist_ok=True)
        screenshot(browser, html, png, args.size)
        print(f"wrote {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
