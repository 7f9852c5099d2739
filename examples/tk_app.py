"""A Tk window that runs a threadflow flow and stays responsive while it runs.

Press "Make thumbnails": the flow runs 40 children, four at a time; some fail once and are
retried, one is broken for good (its failure is tolerated). A progress bar and a log follow the
run; "Cancel" cancels it (the server stays, ready for the next run).

The one rule: **Tk widgets belong to the Tk thread.** threadflow's callbacks and signal
receivers run on the server's coordinator thread, and ``return_to`` is called there too, so
they never touch a widget: they put a message on a ``queue.Queue``, and the Tk thread drains
that queue every 50 ms with ``after()``.

    python examples/tk_app.py [--db PATH] [--autorun]

``--autorun`` presses the button itself and closes the window when the run ends (exit code 0
if it ended ``all_over``): a smoke test for a machine with a display.
"""

from __future__ import annotations

import argparse
import queue
import threading
import tkinter as tk
from tkinter import ttk
from typing import Any

import threadflow
from threadflow import ALL_OVER, Flow, RunResult, add_children_tasks, signals, task

IMAGES = 40
POLL_MS = 50

# -- the flow: plain functions, run on worker threads ----------------------------------------

_failed_once: set[int] = set()
_failed_lock = threading.Lock()


def list_images(state: Any) -> None:
    names = ((n, {"name": f"photo-{n:03d}.jpg"}) for n in range(state["count"]))
    add_children_tasks(names, state)


def make_thumbnail(child: Any, state: Any) -> str:
    n, payload = child
    threadflow.sleep(0.05 + (n % 5) * 0.04)  # the work; wakes at once when cancelled
    if n == 23:
        raise ValueError(f"{payload['name']}: not a JPEG file")
    with _failed_lock:
        first = n % 9 == 4 and n not in _failed_once
        _failed_once.add(n)
    if first:
        raise OSError(f"{payload['name']}: disk busy, try again")
    return payload["name"].replace(".jpg", "-thumb.jpg")


def write_index(state: Any) -> int:
    return sum(1 for _, thumb in threadflow.results(state, "scan") if thumb)


class Thumbnails(Flow, server_name="thumbnails"):
    scan = task(
        task_func=list_images,
        child_task_func=make_thumbnail,
        max_concurrency=4,
        task_retry_limit=2,
        task_timeout=5.0,
        exit_on_failed=False,  # a broken image does not stop the others
        next="index",
    )
    index = task(task_func=write_index, next=ALL_OVER)


# -- the window: everything below runs on the Tk thread, except the receivers -----------------


class App:
    def __init__(self, root: tk.Tk, db: str, autorun: bool = False) -> None:
        self.root = root
        self.db = db
        self.autorun = autorun
        self.outcome: str | None = None
        # Messages from the coordinator thread to the Tk thread.
        self.inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.server: Flow | None = None
        self.receivers: list[tuple[Any, Any]] = []
        self.run: threadflow.RunHandle | None = None  # the run going on, to cancel

        root.title("threadflow in Tk")
        frame = ttk.Frame(root, padding=12)
        frame.pack(fill="both", expand=True)
        buttons = ttk.Frame(frame)
        buttons.pack(fill="x")
        self.start_button = ttk.Button(buttons, text="Make thumbnails", command=self.start)
        self.start_button.pack(side="left")
        self.cancel_button = ttk.Button(
            buttons, text="Cancel", command=self.cancel, state="disabled"
        )
        self.cancel_button.pack(side="left", padx=8)
        self.progress = ttk.Progressbar(frame, maximum=IMAGES, length=420)
        self.progress.pack(fill="x", pady=(12, 4))
        self.status = ttk.Label(frame, text="ready")
        self.status.pack(anchor="w")
        self.log = tk.Listbox(frame, height=12, width=70)
        self.log.pack(fill="both", expand=True, pady=(8, 0))

        root.protocol("WM_DELETE_WINDOW", self.close)
        self.open_server()
        root.after(POLL_MS, self.poll)
        if autorun:
            root.after(200, self.start)

    # The server lives as long as the window; Cancel ends one run, not the server.

    def open_server(self) -> None:
        self.server = Thumbnails.start_link(
            store=self.db, return_to=self.forward("result"), count=IMAGES
        )
        for sig in (signals.task_over, signals.task_retry, signals.task_failed):
            receiver = self.forward(sig.name)
            # weak=False: blinker would otherwise drop this closure at once.
            sig.connect(receiver, sender=self.server, weak=False)
            self.receivers.append((sig, receiver))

    def close_server(self) -> None:
        for sig, receiver in self.receivers:
            sig.disconnect(receiver, sender=self.server)
        self.receivers.clear()
        if self.server is not None:
            self.server.stop(timeout=5)

    def forward(self, name: str) -> Any:
        """A receiver for the coordinator thread: it only puts a message on the queue."""

        def receive(*args: Any, **kw: Any) -> None:
            if name == "result":
                self.inbox.put(("result", args[0]))
            else:
                self.inbox.put((name, kw["task"], kw.get("error")))

        return receive

    # Buttons (Tk thread).

    def start(self) -> None:
        assert self.server is not None
        try:
            handle = self.server.start_flow()
        except threadflow.FlowRunning:
            return  # the button is disabled while a run goes on; a double click lands here
        self.progress["value"] = 0
        self.log.delete(0, "end")
        self.run = handle
        self.status["text"] = f"run {handle.run_id}: running"
        self.start_button["state"] = "disabled"
        self.cancel_button["state"] = "normal"

    def cancel(self) -> None:
        self.cancel_button["state"] = "disabled"
        self.status["text"] = "cancelling..."
        if self.run is not None:
            # Returns at once: the run's result ("cancelled") arrives through return_to.
            self.run.cancel("cancelled from the window")

    def close(self) -> None:
        self.close_server()
        self.root.destroy()

    # The queue (Tk thread): the only place that turns run events into widget changes.

    def poll(self) -> None:
        try:
            while True:
                self.handle(self.inbox.get_nowait())
        except queue.Empty:
            pass
        self.root.after(POLL_MS, self.poll)

    def handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "task_over" and len(message[1]) == 2:
            self.progress["value"] += 1
        elif kind == "task_retry":
            self.log.insert("end", f"retrying {message[1]}: {message[2]}")
        elif kind == "task_failed":
            self.log.insert("end", f"gave up on {message[1]}: {message[2]}")
            self.progress["value"] += 1
        elif kind == "result":
            result: RunResult = message[1]
            self.outcome = result.outcome
            failed = f", {len(result.failed)} tolerated failure(s)" if result.failed else ""
            self.status["text"] = f"run {result.run_id}: {result.outcome}{failed}"
            self.start_button["state"] = "normal"
            self.cancel_button["state"] = "disabled"
            if self.autorun:
                self.root.after(300, self.close)


def main() -> int:
    parser = argparse.ArgumentParser(description="threadflow in a Tk window")
    parser.add_argument("--db", default="tk-example.db", help="the event store file")
    parser.add_argument("--autorun", action="store_true", help="run once, then close")
    args = parser.parse_args()
    root = tk.Tk()
    app = App(root, args.db, autorun=args.autorun)
    root.mainloop()
    return 0 if app.outcome == "all_over" or not args.autorun else 1


if __name__ == "__main__":
    raise SystemExit(main())
