"""The live dashboard in a real browser: ``threadflow ui`` as a process, a run going on in the
store, and a headless Chromium (driven by Playwright) that watches it as a person would.

It needs Playwright (``pip install 'threadflow[ui-test]'``) and the system's Chromium at
:data:`CHROMIUM` (Debian: ``apt-get install chromium``); Playwright's own browser download is
not used. Without them the test is skipped, unless ``THREADFLOW_REQUIRE_BROWSER=1`` (as in CI),
which makes their absence a failure.

Every wait is on what the page shows (Playwright's ``expect`` polls the page); the run moves on
only when the test opens its children's gates.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import threading

import pytest
from helpers import wait_until
from ui_flows import BROKEN, BROKEN_ERROR, CHILDREN, Gated

CHROMIUM = "/usr/bin/chromium"
REQUIRED = os.environ.get("THREADFLOW_REQUIRE_BROWSER") == "1"
#: Chromium's switches: headless, no sandbox (CI runs as root), nothing fetched from the network.
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GUARD = 30.0  # seconds; a hang guard for every wait, never a synchronisation


def unavailable(reason: str) -> None:
    """Skip for ``reason``, or fail when the browser test is required."""
    if REQUIRED:
        pytest.fail(f"{reason}; THREADFLOW_REQUIRE_BROWSER=1 requires the browser test", False)
    pytest.skip(reason)


def browser_tools():
    """Playwright's ``sync_playwright`` and ``expect``, if the browser test can run here."""
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        unavailable("Playwright is not installed (pip install 'threadflow[ui-test]')")
    if importlib.util.find_spec("datasette") is None:  # the dashboard's process imports it
        unavailable("the ui extra (Datasette) is not installed")
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    return sync_playwright, expect


@pytest.fixture
def dashboard(store_path):
    """Start ``threadflow ui`` on the store (made first); yield its address; Ctrl-C it."""
    proc = None

    def start():
        nonlocal proc
        proc = subprocess.Popen(
            [sys.executable, "-m", "threadflow", "ui", "--db", store_path, "--port", "0"],
            stderr=subprocess.PIPE,
            text=True,
        )
        line = proc.stderr.readline()
        found = re.search(r" at (http://127\.0\.0\.1:\d+/-/threadflow) ", line)
        assert found, f"threadflow ui printed {line!r}"
        return found.group(1)

    yield start
    if proc is not None:
        proc.send_signal(signal.SIGINT)
        proc.wait(GUARD)
        proc.stderr.close()
        assert proc.returncode == 0


def test_a_person_watches_a_run_go_on_fail_and_gets_the_command_to_replay_it(
    dashboard, store_path, tmp_path
):
    sync_playwright, expect = browser_tools()
    gates = {i: threading.Event() for i in range(CHILDREN)}
    server = Gated.start_link(store=store_path, gates=gates)
    try:
        handle = server.start_flow()
        assert wait_until(lambda: handle.progress().running == 4)
        address = dashboard()
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"),  # a fresh profile
                executable_path=CHROMIUM,
                headless=True,
                args=ARGS,
                viewport={"width": 1300, "height": 900},
                permissions=["clipboard-read", "clipboard-write"],
            )
            try:
                page = context.new_page()
                dialogs, errors = [], []
                page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                watch(page, expect, address, handle, gates, store_path, tmp_path)
                assert dialogs == [] and errors == []
            finally:
                context.close()
    finally:
        for gate in gates.values():
            gate.set()
        server.stop()


def watch(page, expect, address, handle, gates, store_path, tmp_path):
    wait = GUARD * 1000
    # The runs list: the run, running, none of its six children finished, four running.
    page.goto(address)
    row = page.locator("tbody[data-part=rows] tr", has_text=handle.run_id)
    expect(row).to_contain_text("running", timeout=wait)
    expect(row).to_contain_text("0/6 · 4 running", timeout=wait)
    # Two children finish: the list says so without a reload.
    gates[0].set()
    gates[1].set()
    expect(row).to_contain_text("2/6 · 4 running", timeout=wait)
    shot(page, tmp_path / "runs.png")

    # The run's page: its progress and its timeline, as they change.
    row.get_by_role("link", name=handle.run_id).click()
    expect(page).to_have_url(re.compile(f"/run/{handle.run_id}$"), timeout=wait)
    head = page.locator("[data-part=head]")
    progress = page.locator("[data-part=progress]")
    over = page.locator('[data-part=timeline] rect.bar[fill="#2f9e58"]')
    expect(head).to_contain_text("Gated", timeout=wait)
    expect(head.locator(".status")).to_have_text("running", timeout=wait)
    expect(progress).to_contain_text("2 of 6 children finished: 2 done, 0 failed, 4 running")
    expect(over).to_have_count(3, timeout=wait)  # the parent's attempt and two children
    expect(page.locator("[data-part=failures]")).to_contain_text("No attempt has raised")
    shot(page, tmp_path / "run-running.png")
    for i in range(CHILDREN):
        if i != BROKEN:
            gates[i].set()
    expect(progress).to_contain_text("5 of 6 children finished", timeout=wait)
    expect(over).to_have_count(6, timeout=wait)

    # The broken child fails twice: the run fails, its attempts show their tracebacks.
    gates[BROKEN].set()
    expect(head.locator(".status")).to_have_text("failed_over", timeout=wait)
    failures = page.locator("[data-part=failures]")
    expect(failures.locator("h2")).to_have_text("Failed attempts (2)", timeout=wait)
    newest = failures.locator("details").first
    expect(newest.locator("summary")).to_contain_text(f"fetch[{BROKEN}] attempt 2")
    traceback = newest.locator("pre")
    expect(traceback).to_be_hidden()
    newest.locator("summary").click()
    expect(traceback).to_be_visible()
    expect(traceback).to_contain_text("Traceback (most recent call last)")
    expect(traceback).to_contain_text(f"ValueError: {BROKEN_ERROR}")  # as text, not markup
    # The opened traceback stays open while the page goes on updating.
    polls = page.evaluate("Number(document.body.dataset.polls)")
    page.wait_for_function("n => Number(document.body.dataset.polls) > n", arg=polls + 1)
    expect(traceback).to_be_visible()

    # The command to replay it, and the button that copies it.
    command = f"threadflow replay {handle.run_id} --db {shlex.quote(os.path.abspath(store_path))}"
    expect(page.locator("#replay-command")).to_have_text(command, timeout=wait)
    page.get_by_role("button", name="Copy").click()
    expect(page.get_by_role("button", name="Copied")).to_be_visible(timeout=wait)
    assert page.evaluate("navigator.clipboard.readText()") == command
    shot(page, tmp_path / "run-failed.png", full_page=True)


def shot(page, path, full_page=False):
    """A screenshot of the page, checked to be a PNG with something in it."""
    page.screenshot(path=str(path), full_page=full_page)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, path
