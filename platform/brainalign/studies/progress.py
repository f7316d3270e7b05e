"""What a study has done, read from MLflow: ``brainalign study status`` and the live view.

Both come from one function, :func:`collect`, which counts the runs under the study run:
per search the trials done / running / pruned (stopped by ASHA) / failed / killed and the
best validation value so far, and the tested runs done out of the plan's total. The live
view (:class:`LiveView`) polls it while a study runs: one compact table on a terminal
(``rich``), one log line every half minute elsewhere (a Ray job's log, CI). Everything
verbose (Tune's tables, the library's INFO logs) goes to the study's log file instead.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .. import tracking
from ..paths import Locations
from .spec import Study
from .units import Plan, StudyContext

__all__ = ["Counts", "LiveView", "Progress", "SearchProgress", "collect", "render_lines"]

log = logging.getLogger(__name__)


@dataclass
class Counts:
    """Runs of one kind (a search's trials, the tested runs) by state."""

    total: int
    budget: int  # epochs of one run
    done: int = 0
    running: int = 0
    pruned: int = 0
    failed: int = 0
    killed: int = 0
    epochs: int = 0  # epochs resolved: a finished, pruned or failed run counts its whole budget

    @property
    def started(self) -> int:
        return self.done + self.running + self.pruned + self.failed + self.killed

    def add(self, r: tracking.RunRecord) -> None:
        """Count one run (a ``pruned`` tag wins over its status)."""
        if r.tags.get("pruned") == "true":
            self.pruned += 1
        elif r.status == "RUNNING":
            self.running += 1
        elif r.status == "FINISHED":
            self.done += 1
        elif r.status == "FAILED":
            self.failed += 1
        else:
            self.killed += 1
        running = r.status == "RUNNING" and r.tags.get("pruned") != "true"
        self.epochs += min(self.budget, int(r.metrics.get("epoch", -1)) + 1) if running else self.budget


@dataclass
class SearchProgress:
    """One search: its trials and the best value of its selection metric so far."""

    key: str
    metric: str
    mode: str
    trials: Counts
    best: float = float("nan")

    def add(self, r: tracking.RunRecord) -> None:
        self.trials.add(r)
        value = r.metrics.get(self.metric)
        if value is not None and not math.isnan(value):
            better = math.isnan(self.best) or (value > self.best if self.mode == "max" else value < self.best)
            self.best = value if better else self.best


@dataclass
class Progress:
    """A study's progress (see :func:`collect`)."""

    study: str
    kind: str
    study_run_id: str
    study_status: str
    runs: Counts
    searches: list[SearchProgress] = field(default_factory=list)

    @property
    def epochs_total(self) -> int:
        """Upper bound of the epochs the study trains (ASHA prunes some)."""
        return sum(c.total * c.budget for c in self._counts())

    @property
    def epochs_done(self) -> int:
        return sum(c.epochs for c in self._counts())

    def _counts(self) -> list[Counts]:
        return [s.trials for s in self.searches] + [self.runs]


def collect(study: Study, plan: Plan, study_run_id: str, uri: str) -> Progress:
    """Count what the runs under ``study_run_id`` have done (nothing yet when it is ``""``)."""
    searches = plan.searches(StudyContext(study_run_id, Locations.current()))
    keys = set(plan.run_keys())
    runs = tracking.find_runs(study.experiment, {"study": study.name}, uri) if study_run_id else []
    status = next((r.status for r in runs if r.run_id == study_run_id), "")
    search_runs = {r.run_id: r.tags.get("search", "") for r in runs
                   if r.tags.get("role") == "search" and r.parent_run_id == study_run_id}
    p = Progress(study.name, study.kind, study_run_id, status, Counts(len(keys), study.max_epochs))
    by_key = {u.key: SearchProgress(u.key, u.space.metric, u.space.mode, Counts(u.trials, u.max_epochs))
              for u in searches}
    p.searches = list(by_key.values())
    tested: dict[str, tracking.RunRecord] = {}
    for r in runs:
        role = r.tags.get("role")
        if role == "trial" and search_runs.get(r.parent_run_id) in by_key:
            by_key[search_runs[r.parent_run_id]].add(r)
        elif role == "final" and r.parent_run_id == study_run_id and r.tags.get("final_key") in keys:
            tested[r.tags["final_key"]] = r  # the newest run of each unit
    for r in tested.values():
        p.runs.add(r)
    return p


def _dur(seconds: float) -> str:
    if math.isnan(seconds) or seconds < 0:
        return "–"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _best(sp: SearchProgress) -> str:
    return "–" if math.isnan(sp.best) else f"{sp.best:.4g}"


def _state(c: Counts) -> str:
    return f"{c.done} done, {c.running} running, {c.pruned} pruned, {c.failed} failed, {c.killed} killed"


def render_lines(p: Progress, *, elapsed: float = float("nan"), eta: float = float("nan")) -> list[str]:
    """``status`` as plain text: one line per search and one for the tested runs."""
    head = f"study {p.study} ({p.kind})"
    if p.study_run_id:
        head += f", study run {p.study_run_id} {p.study_status or '?'}"
    if not math.isnan(elapsed):
        head += f"; elapsed {_dur(elapsed)}, ETA {_dur(eta)}"
    lines = [head]
    if p.searches:
        width = max(len(s.key) for s in p.searches)
        lines.append(f"  {'search':<{width}}  trials  done  running  pruned  failed  killed  best")
        for s in p.searches:
            t = s.trials
            lines.append(f"  {s.key:<{width}}  {t.started:>3}/{t.total:<3} {t.done:>4}  {t.running:>7}  "
                         f"{t.pruned:>6}  {t.failed:>6}  {t.killed:>6}  {_best(s)} ({s.metric})")
    r = p.runs
    lines.append(f"  tested runs: {r.done}/{r.total} done, {r.running} running, {r.failed} failed, {r.killed} killed")
    return lines


def _one_line(p: Progress, elapsed: float, eta: float) -> str:
    parts = [f"{s.key}: {s.trials.started}/{s.trials.total} trials ({_state(s.trials)}), best {_best(s)}"
             for s in p.searches]
    parts.append(f"tested runs {p.runs.started}/{p.runs.total} ({_state(p.runs)})")
    return f"[{p.study}] " + "; ".join(parts) + f"; elapsed {_dur(elapsed)}, ETA {_dur(eta)}"


def _rich_table(p: Progress, elapsed: float, eta: float) -> Any:
    from rich.table import Table

    t = Table(title=f"study {p.study} ({p.kind}) · elapsed {_dur(elapsed)} · ETA {_dur(eta)}", title_justify="left",
              box=None, pad_edge=False)
    for col in ("", "started", "done", "running", "pruned", "failed", "best"):
        t.add_column(col, justify="left" if not col else "right")
    rows = [(s.key, s.trials, f"{_best(s)} {s.metric}") for s in p.searches] + [("tested runs", p.runs, "")]
    for name, c, best in rows:
        t.add_row(name, f"{c.started}/{c.total}", str(c.done), str(c.running), str(c.pruned) if best else "",
                  str(c.failed + c.killed), best)
    return t


class _ToLive:
    """A stream for the console log handler while the live view owns the terminal."""

    def __init__(self, console: Any) -> None:
        self.console = console

    def write(self, text: str) -> int:
        if text.strip():
            self.console.print(text.rstrip("\n"), markup=False, highlight=False)
        return len(text)

    def flush(self) -> None:
        pass


class LiveView:
    """The live console view of a running study, polling :func:`collect` in a thread.

    On a terminal, a ``rich`` table redrawn in place; console log records below WARNING go
    only to ``log_file`` meanwhile. Elsewhere, one progress line every ``line_every``
    seconds through the logger. ``log_file`` gets every library log record of the session.

    Parameters
    ----------
    study, plan : Study, Plan
        What runs.
    study_run_id, uri : str
        The study run and tracking URI.
    log_file : Path
        The study's log file.
    enabled : bool
        False: no view (the log file is still written).
    interval : float
        Seconds between polls.
    line_every : float
        Seconds between progress lines when not on a terminal.
    """

    def __init__(self, study: Study, plan: Plan, study_run_id: str, uri: str, *, log_file: Path,
                 enabled: bool = True, interval: float = 2.0, line_every: float = 30.0) -> None:
        self.args = (study, plan, study_run_id, uri)
        self.log_file = log_file
        self.enabled = enabled
        self.interval = interval
        self.line_every = line_every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Any = None
        self._file_handler: logging.Handler | None = None
        self._muted: list[tuple[logging.StreamHandler[Any], Any, int]] = []
        self._t0 = time.monotonic()
        self._epochs0: int | None = None

    # ----------------------------------------------------------------- timing
    def _times(self, p: Progress) -> tuple[float, float]:
        elapsed = time.monotonic() - self._t0
        if self._epochs0 is None:
            self._epochs0 = p.epochs_done
        gained = p.epochs_done - self._epochs0
        left = max(0, p.epochs_total - p.epochs_done)
        return elapsed, (elapsed / gained * left if gained > 0 else float("nan"))

    def snapshot(self) -> tuple[Progress, float, float]:
        p = collect(*self.args)
        return (p, *self._times(p))

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> LiveView:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._file_handler = logging.FileHandler(self.log_file)
        self._file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("brainalign").addHandler(self._file_handler)
        if not self.enabled:
            return self
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.live import Live

            console = Console(file=sys.stderr)
            self._live = Live(console=console, auto_refresh=False, transient=False)
            self._live.start()
            for h in logging.getLogger().handlers:
                if type(h) is logging.StreamHandler and getattr(h.stream, "isatty", lambda: False)():
                    self._muted.append((h, h.stream, h.level))
                    h.setStream(_ToLive(console))  # type: ignore[arg-type]
                    h.setLevel(max(h.level, logging.WARNING))
        self._thread = threading.Thread(target=self._loop, name="study-live-view", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        last_line = 0.0
        while not self._stop.wait(self.interval):
            try:
                p, elapsed, eta = self.snapshot()
            except Exception as e:  # a busy store: try again at the next poll
                log.debug("progress poll failed: %s", e)
                continue
            if self._live is not None:
                self._live.update(_rich_table(p, elapsed, eta), refresh=True)
            elif time.monotonic() - last_line >= self.line_every:
                last_line = time.monotonic()
                log.info("%s", _one_line(p, elapsed, eta))

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._live is not None:
            try:
                p, elapsed, eta = self.snapshot()
                self._live.update(_rich_table(p, elapsed, eta), refresh=True)
            except Exception:  # the final redraw is a courtesy
                pass
            self._live.stop()
        for h, stream, level in self._muted:
            h.setStream(stream)
            h.setLevel(level)
        if self._file_handler is not None:
            logging.getLogger("brainalign").removeHandler(self._file_handler)
            self._file_handler.close()


def status_lines(study: Study, plan: Plan, study_run_id: str, uri: str, extra: Sequence[str] = ()) -> list[str]:
    """The lines ``brainalign study status`` prints."""
    return [*render_lines(collect(study, plan, study_run_id, uri)), *extra]
