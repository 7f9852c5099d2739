"""The live dashboard's pages: the runs list and a run's page, drawn from
:mod:`threadflow.dashboard`'s models as HTML fragments.

The same fragments make the first page and each update: the page's script
(:data:`SCRIPT`, served as a file of its own) polls the JSON of its page, which carries them,
and puts each one that changed in its place. So there is one drawing, in Python, and every
string that came from the log (task names, child ids, errors, tracebacks, run ids) is escaped
here, once; the script never builds markup from data. Inline CSS, no external asset: the
dashboard works without a network.

It draws and formats only: every number comes from the models, and so from the fold.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import quote

from ._format import compact, duration, error_text, plural, timestamp
from ._format import html_text as _e
from ._timeline_html import chart, legend
from .dashboard import FAILURES_SHOWN, POLL, Failure, RunLine, RunView
from .progress import attempt_text
from .result import Progress, TaskProgress

#: Colours of the run statuses, as the timeline draws them.
STATUS_COLORS = {
    "running": "#3b7dd8",
    "all_over": "#2f9e58",
    "failed_over": "#d8413c",
    "interrupted": "#7d8590",
    "cancelled": "#b07d2b",
}

CSS = """
:root{--fg:#1f2328;--muted:#59636e;--faint:#818b98;--line:#d1d9e0;--bg:#f6f8fa;
--done:#2f9e58;--failed:#d8413c;--running:#3b7dd8;--rest:#e3e8ee}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
margin:0;background:var(--bg)}
a{color:#0b62c4;text-decoration:none}a:hover{text-decoration:underline}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px}
nav.top{display:flex;flex-wrap:wrap;align-items:baseline;gap:4px 14px;padding:10px 24px;
background:#24292f;color:#d1d9e0;font-size:13px}
nav.top .brand{color:#fff;font-weight:600;font-size:15px}
nav.top a{color:#9ecbff}nav.top .store{margin-left:auto;color:#afb8c1}
main{max-width:1240px;margin:0 auto;padding:18px 24px 28px}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 18px;
margin:0 0 16px}
h1{font-size:22px;margin:0 0 6px;font-weight:600}
h1 .run{font-weight:400;color:var(--muted);font-family:ui-monospace,Menlo,Consolas,monospace;
font-size:16px}
h2{font-size:16px;margin:0 0 10px;font-weight:600}
h2 .count{color:var(--muted);font-weight:400}
.status{display:inline-block;color:#fff;border-radius:10px;padding:1px 9px;font-size:12.5px;
font-weight:500;vertical-align:2px;white-space:nowrap}
.facts{display:flex;flex-wrap:wrap;gap:2px 18px;margin:0;color:var(--muted)}
.facts b{color:var(--fg);font-weight:600}
.live{color:var(--faint);font-size:12.5px}
.live i{display:inline-block;width:8px;height:8px;border-radius:50%;background:var(--running);
margin-right:5px;vertical-align:0;animation:pulse 1.6s ease-in-out infinite}
.live.ended i{background:var(--faint);animation:none}
@keyframes pulse{50%{opacity:.25}}
.failure{margin:10px 0 0;padding:8px 12px;border-left:4px solid var(--failed);
background:#fdf0ef;border-radius:0 6px 6px 0}
.bar{display:flex;height:10px;border-radius:5px;overflow:hidden;background:var(--rest);
min-width:120px}
.bar span{display:block;height:100%}
.bar .done{background:var(--done)}.bar .failed{background:var(--failed)}
.bar .running{background:repeating-linear-gradient(135deg,var(--running) 0 4px,#7aa7e6 4px 8px)}
.overall .bar{height:16px;border-radius:8px;margin:4px 0 6px}
.overall .numbers{color:var(--muted)}.overall .numbers b{color:var(--fg)}
table{border-collapse:collapse;width:100%}
th,td{padding:6px 10px 6px 0;text-align:left;white-space:nowrap;vertical-align:middle}
th{color:var(--muted);font-weight:500;font-size:12.5px;border-bottom:1px solid var(--line)}
td{border-bottom:1px solid #eef1f4}
tr:last-child td{border-bottom:0}
td.num,th.num{text-align:right}
td.grow{width:40%}
.tasks{margin-top:12px}
.bad{color:#c22d28;font-weight:600}
.muted{color:var(--muted)}
.slow{margin:10px 0 0;color:var(--muted);font-size:13px}
.replay{display:flex;flex-wrap:wrap;align-items:center;gap:8px 12px;margin-top:12px}
.replay code{background:#24292f;color:#e6edf3;padding:7px 12px;border-radius:6px;
user-select:all;overflow-wrap:anywhere}
button{font:inherit;font-size:13px;padding:5px 12px;border:1px solid var(--line);
border-radius:6px;background:#f6f8fa;cursor:pointer}
button:hover{background:#eef1f4}
.chart{overflow-x:auto}
.legend{display:flex;flex-wrap:wrap;gap:2px 16px;margin:0 0 8px;padding:0;list-style:none;
font-size:12.5px;color:var(--muted)}
.legend i{display:inline-block;width:14px;height:10px;border-radius:2px;margin-right:5px;
vertical-align:-1px}
svg{display:block;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
svg .bar:hover{stroke:#1f2328;stroke-width:1.5}
svg .row:hover{fill:#eef3fb}
ol.failures{list-style:none;margin:0;padding:0}
ol.failures li{border-top:1px solid #eef1f4;padding:6px 0}
ol.failures li:first-child{border-top:0}
details summary{cursor:pointer}
.kind{display:inline-block;min-width:58px;text-align:center;border-radius:4px;color:#fff;
font-size:12px;padding:0 6px;margin-right:6px}
.kind.exit{background:var(--failed)}.kind.timeout{background:#ee8a1f}
pre{margin:6px 0 2px;padding:8px 10px;background:#f6f8fa;border:1px solid #eef1f4;
border-radius:6px;font-size:12px;white-space:pre-wrap;overflow-wrap:anywhere;max-height:22em;
overflow:auto}
#problem{display:none;margin:0 0 16px;padding:8px 12px;border-radius:6px;background:#fff4e5;
border:1px solid #f0c36d}
#problem.shown{display:block}
footer{color:var(--faint);font-size:12px;margin-top:6px}
"""

#: The pages' script: polls the page's JSON and swaps in the fragments that changed. It only
#: ever inserts markup the server made (escaped there); data from the log is never turned into
#: markup here. Served as a file, so that the pages can forbid inline scripts.
SCRIPT = """\
"use strict";
(function () {
  const root = document.querySelector("[data-poll]");
  const problem = document.getElementById("problem");
  const every = Number(root && root.dataset.every) || 1000;
  const shown = {};
  function say(text) {
    if (!problem) return;
    problem.textContent = text;
    problem.classList.toggle("shown", Boolean(text));
  }
  function swap(name, html) {
    const part = document.querySelector('[data-part="' + name + '"]');
    if (!part || shown[name] === html) return;
    // Tracebacks the reader opened stay open.
    const open = new Set(Array.from(part.querySelectorAll("details[open][data-key]"),
      (d) => d.dataset.key));
    part.innerHTML = html;
    part.querySelectorAll("details[data-key]").forEach((d) => {
      if (open.has(d.dataset.key)) d.open = true;
    });
    shown[name] = html;
  }
  async function poll() {
    try {
      const response = await fetch(root.dataset.poll, {cache: "no-store"});
      const data = await response.json();
      if (!response.ok) {
        say(data.error || ("the dashboard answered " + response.status));
      } else {
        say("");
        for (const [name, html] of Object.entries(data.html)) swap(name, html);
        root.dataset.status = data.status || "";
      }
      root.dataset.polls = String((Number(root.dataset.polls) || 0) + 1);
    } catch (err) {
      say("The dashboard does not answer (stopped?); trying again every second.");
    }
    setTimeout(poll, every);
  }
  if (root) setTimeout(poll, every);
  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-copy]");
    if (!button) return;
    const source = document.getElementById(button.dataset.copy);
    const text = source ? source.textContent : "";
    const done = () => { button.textContent = "Copied"; };
    const select = () => {
      const range = document.createRange();
      range.selectNodeContents(source);
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      button.textContent = "Selected: press Ctrl+C";
    };
    if (navigator.clipboard) navigator.clipboard.writeText(text).then(done, select);
    else select();
  });
})();
"""


def status_badge(status: str) -> str:
    color = STATUS_COLORS.get(status, "#7d8590")
    return f'<span class=status style="background:{color}">{_e(status)}</span>'


def run_url(base: str, run_id: str) -> str:
    """The page of ``run_id`` under the dashboard's ``base`` path (any run id is one segment)."""
    return f"{base}/run/{quote(run_id, safe='')}"


def _bar(p: Progress | TaskProgress, title: str) -> str:
    """Children done, failed and running, as shares of the children so far."""
    total = max(p.total, p.finished + p.running)
    if not total:
        return f'<div class=bar title="{_e(title)}"></div>'
    spans = "".join(
        f'<span class={name} style="width:{100 * count / total:.2f}%"></span>'
        for name, count in (("done", p.done), ("failed", p.failed), ("running", p.running))
        if count
    )
    return f'<div class=bar title="{_e(title)}">{spans}</div>'


def _counts(p: Progress | TaskProgress) -> str:
    """``7/10 · 1 failed · 3 running`` (finished of all so far)."""
    text = f"{p.finished}/{p.total}"
    if p.failed:
        text += f" · <span class=bad>{p.failed} failed</span>"
    if p.running:
        text += f" · {p.running} running"
    return text


def _who(task: str, child_id: object, child: bool) -> str:
    return f"{task}[{compact(child_id)}]" if child else task


# -- the runs list -----------------------------------------------------------------------------


def runs_rows(lines: Sequence[RunLine], base: str) -> str:
    """The runs list's table body."""
    if not lines:
        return (
            "<tr><td colspan=7 class=muted>No runs in this store yet: this list shows them as "
            "they start.</td></tr>"
        )
    out = []
    for line in lines:
        p = line.progress
        title = f"{p.done} done, {p.failed} failed, {p.running} running of {p.total} children"
        out.append(
            "<tr>"
            f"<td>{status_badge(line.status)}</td>"
            f'<td class=mono><a href="{_e(run_url(base, line.run_id))}">{_e(line.run_id)}</a></td>'
            f"<td>{_e(line.flow)}</td>"
            f"<td>{_e(timestamp(line.started))}</td>"
            f"<td class=num>{_e(duration(p.seconds))}</td>"
            f"<td class=grow>{_bar(p, title)}</td>"
            f"<td class=num>{_counts(p)}</td>"
            f"<td class=num>{p.segments}</td>"
            "</tr>"
        )
    return "\n".join(out)


def runs_parts(lines: Sequence[RunLine], base: str) -> dict[str, str]:
    """The parts of the runs list that an update replaces."""
    running = sum(1 for line in lines if line.status == "running")
    summary = f"{plural(len(lines), 'run', 'runs')}, {running} running"
    return {"rows": runs_rows(lines, base), "summary": _e(summary)}


def runs_page(lines: Sequence[RunLine], base: str, path: str, tables: str, limit: int) -> str:
    parts = runs_parts(lines, base)
    more = (
        f"<p class=muted>The newest {limit} runs; every run: "
        f"<code>threadflow runs --db {_e(path)}</code></p>"
        if len(lines) >= limit
        else ""
    )
    body = f"""
<div class=card>
<h1>Runs <span class=live><i></i><span data-part=summary>{parts["summary"]}</span></span></h1>
<p class=muted>Newest first. Progress counts children: done, failed and running, of all those
added so far.</p>
<table class=runs>
<thead><tr><th>status</th><th>run</th><th>flow</th><th>started (UTC)</th>
<th class=num>duration</th><th>progress</th><th class=num>finished/all</th>
<th class=num>segments</th></tr></thead>
<tbody data-part=rows>
{parts["rows"]}
</tbody></table>
{more}
</div>"""
    return page("threadflow runs", body, base, path, tables, poll=f"{base}/api/runs")


# -- a run ---------------------------------------------------------------------------------------


def _head(view: RunView) -> str:
    p = view.progress
    live = view.status == "running"
    facts = [
        ("started", f"{timestamp(view.started)} UTC" if view.started else "-"),
        ("running for" if live else "ran for", duration(p.seconds)),
        ("entrance", view.entrance or "-"),
        ("segments", str(p.segments)),
    ]
    out = [
        f"<h1>{_e(view.flow or '?')} <span class=run>run {_e(view.run_id)}</span> "
        f"{status_badge(view.status)}</h1>",
        "<p class=facts>"
        + "".join(f"<span>{_e(k)} <b>{_e(v)}</b></span>" for k, v in facts)
        + (
            "<span class=live><i></i>live: updates every second</span>"
            if live
            else "<span class='live ended'><i></i>not running</span>"
        )
        + "</p>",
    ]
    if view.failed_task:
        name, *child = view.failed_task
        who = _who(str(name), child[0] if child else None, bool(child))
        out.append(
            f"<div class=failure><b>failed task {_e(who)}</b>: {_e(error_text(view.error))}</div>"
        )
    return "\n".join(out)


def _replay(view: RunView) -> str:
    """The command that replays the run, once it can be replayed; else nothing."""
    if view.replay is None:
        return ""
    return (
        "<div class=replay><b>Replay it:</b>"
        f"<code id=replay-command>{_e(view.replay)}</code>"
        '<button type=button data-copy="replay-command">Copy</button>'
        "<span class=muted>it goes on from the log under the same run id; what finished is not "
        "run again</span></div>"
    )


def _task_row(t: TaskProgress) -> str:
    state = f"<span class=bad>{_e(t.state)}</span>" if t.state == "failed" else _e(t.state)
    if t.total or t.finished:
        title = f"{t.done} done, {t.failed} failed, {t.running} running of {t.total} children"
        bar, counts = _bar(t, title), _counts(t)
    else:
        bar, counts = "<span class=muted>no children</span>", "-"
    return (
        "<tr>"
        f"<td class=mono>{_e(t.name)}</td>"
        f"<td>{state}</td>"
        f"<td class=grow>{bar}</td>"
        f"<td class=num>{counts}</td>"
        f"<td class=num>{t.attempts}</td>"
        f"<td class=num>{_e(duration(t.seconds) if t.state != 'waiting' else '-')}</td>"
        "</tr>"
    )


def _progress(view: RunView) -> str:
    p = view.progress
    title = f"{p.done} done, {p.failed} failed, {p.running} running of {p.total} children"
    numbers = (
        f"<b>{p.finished}</b> of <b>{p.total}</b> children finished: "
        f"<b>{p.done}</b> done, "
        + (f"<b class=bad>{p.failed}</b> failed, " if p.failed else "<b>0</b> failed, ")
        + f"<b>{p.running}</b> running"
    )
    out = [
        "<h2>Progress</h2>",
        f"<div class=overall>{_bar(p, title)}<div class=numbers>{numbers}</div></div>",
        "<table class=tasks><thead><tr><th>task</th><th>state</th><th>children</th>"
        "<th class=num>finished/all</th><th class=num>attempts</th><th class=num>time</th>"
        "</tr></thead><tbody>",
        *(_task_row(t) for t in p.tasks.values()),
        "</tbody></table>",
    ]
    if p.slowest:
        names = ", ".join(attempt_text(a) for a in p.slowest)
        out.append(f"<p class=slow>running longest: {_e(names)}</p>")
    return "\n".join(out)


def _failure(f: Failure) -> str:
    who = _who(f.task, f.child_id, f.child)
    attempt = f" attempt {f.attempt}" if f.attempt is not None else ""
    traceback = f.error.get("traceback")
    summary = (
        f"<span class='kind {_e(f.kind)}'>{_e(f.kind)}</span><b class=mono>{_e(who)}</b>"
        f"{_e(attempt)} <span class=muted>· {_e(timestamp(f.ts, millis=True))} ·</span> "
        f"{_e(error_text(f.error))}"
    )
    if not traceback:
        return f"<li>{summary}</li>"
    return (
        f'<li><details data-key="{f.seq}"><summary>{summary}</summary>'
        f"<pre>{_e(traceback)}</pre></details></li>"
    )


def _failures(view: RunView) -> str:
    count = view.failed_attempts
    out = [f"<h2>Failed attempts <span class=count>({count})</span></h2>"]
    if not view.failures:
        out.append("<p class=muted>No attempt has raised or timed out.</p>")
        return "\n".join(out)
    if count > len(view.failures):
        out.append(
            f"<p class=muted>The newest {FAILURES_SHOWN}; all of them: <code>threadflow show "
            f"{_e(view.run_id)} --kind exit --kind timeout --db {_e(view.path)}</code></p>"
        )
    out.append("<p class=muted>Newest first; open one for its traceback.</p>")
    out.append("<ol class=failures>" + "".join(_failure(f) for f in view.failures) + "</ol>")
    return "\n".join(out)


def timeline_part(view: RunView) -> str:
    """The timeline part of a run's page: the legend and the chart."""
    return legend() + chart(view.timeline)


def run_parts(view: RunView, timeline: str | None = None) -> dict[str, str]:
    """The parts of a run's page that an update replaces.

    :param timeline: :func:`timeline_part` of ``view``, if drawn already.
    """
    return {
        "head": _head(view),
        "replay": _replay(view),
        "progress": _progress(view),
        "failures": _failures(view),
        "timeline": timeline_part(view) if timeline is None else timeline,
    }


def run_page(view: RunView, parts: dict[str, str], base: str, tables: str) -> str:
    """The whole page of a run, of its ``parts`` (:func:`run_parts`)."""
    body = f"""
<div class=card><div data-part=head>{parts["head"]}</div>
<div data-part=replay>{parts["replay"]}</div></div>
<div class=card data-part=progress>{parts["progress"]}</div>
<div class=card><h2>Timeline</h2>
<p class=muted>One row per task and per child, one bar per attempt; hover a bar for its times
and error.</p>
<div class=chart data-part=timeline>{parts["timeline"]}</div></div>
<div class=card data-part=failures>{parts["failures"]}</div>"""
    title = f"{view.flow or 'threadflow'} run {view.run_id}: {view.status}"
    poll = f"{base}/api/run/{quote(view.run_id, safe='')}"
    return page(title, body, base, view.path, tables, poll=poll, run_id=view.run_id)


# -- the frame -----------------------------------------------------------------------------------


def page(
    title: str,
    body: str,
    base: str,
    path: str,
    tables: str,
    poll: str | None = None,
    run_id: str | None = None,
) -> str:
    """A whole page: the top bar, ``body`` (markup made here), the script if it polls.

    :param tables: the URL of Datasette's own page of the store's tables.
    """
    crumbs = f'<a href="{_e(base)}">runs</a>'
    if run_id is not None:
        crumbs += f" › <span class=mono>{_e(run_id)}</span>"
    polled = f' data-poll="{_e(poll)}" data-every="{int(POLL * 1000)}"' if poll is not None else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{CSS}</style></head>
<body{polled}>
<nav class=top><span class=brand>threadflow</span>{crumbs}
<span class=store>store <span class=mono>{_e(path)}</span> · <a href="{_e(tables)}">tables
(Datasette)</a></span></nav>
<main>
<div id=problem role=status></div>
{body}
<footer>Read from the store's event log; this page never writes to it.</footer>
</main>
<script src="{_e(base)}/dashboard.js" defer></script>
</body></html>
"""


def error_page(base: str, path: str, tables: str, message: str, hint: str) -> str:
    body = f"<div class=card><h1>{_e(message)}</h1><p>{_e(hint)}</p></div>"
    return page("threadflow: " + message, body, base, path, tables)
