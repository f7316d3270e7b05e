"""Searches side by side, in-process and without Ray: the thread runner of the engine, the
thread-safe state file, the shared console redirection and the stop callback of Tune loops.

Threads meet through events and barriers; their timeouts only keep a broken runner from
hanging the test (they are never what is asserted).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import threading
from pathlib import Path

import pytest

from brainalign.studies.engine import side_by_side

WAIT = 60.0  # a guard against a hang, never reached when the runner works


def test_items_run_at_once_up_to_the_limit_and_all_finish() -> None:
    lock = threading.Lock()
    active, peak, done = [0], [0], []
    both = threading.Barrier(2, timeout=WAIT)  # the first two must be running at the same time

    def work(item: int, stop: threading.Event) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        if item < 2:
            both.wait()
        with lock:
            active[0] -= 1
            done.append(item)

    side_by_side(list(range(5)), work, 2, poll_s=0.05)
    assert sorted(done) == [0, 1, 2, 3, 4] and peak[0] == 2


def test_a_failed_item_lets_the_running_one_finish_starts_no_more_then_raises() -> None:
    started, finished = [], []
    b_started, a_failed = threading.Event(), threading.Event()

    def work(item: str, stop: threading.Event) -> None:
        started.append(item)
        if item == "a":
            assert b_started.wait(WAIT)
            a_failed.set()
            raise ValueError("search a diverged")
        if item == "b":
            b_started.set()
            assert a_failed.wait(WAIT)
            assert not stop.is_set()  # a failure is not a stop: b's result is still recorded
        finished.append(item)

    with pytest.raises(ValueError, match="search a diverged"):
        side_by_side(["a", "b", "c"], work, 2, poll_s=0.05)
    assert finished == ["b"] and "c" not in started


def test_a_signal_in_the_calling_thread_stops_every_thread_then_propagates() -> None:
    """What Ctrl-C / SIGTERM do to searches side by side: the StopGuard's handler raises in the
    main thread; every search thread sees ``stop``, ends, and only then the error propagates."""

    class Stopped(KeyboardInterrupt):
        pass

    def handler(signum: int, frame: object) -> None:
        raise Stopped("SIGINT")

    running = threading.Barrier(3, timeout=WAIT)  # two items + the one that sends the signal
    ended: list[str] = []

    def work(item: str, stop: threading.Event) -> None:
        running.wait()
        if item == "a":
            os.kill(os.getpid(), signal.SIGINT)  # delivered to the main thread
        assert stop.wait(WAIT)
        ended.append(item)

    def signaller() -> None:
        running.wait()

    saved = signal.signal(signal.SIGINT, handler)
    try:
        threading.Thread(target=signaller, daemon=True).start()
        with pytest.raises(Stopped):
            side_by_side(["a", "b", "c"], work, 2, poll_s=0.05)
    finally:
        signal.signal(signal.SIGINT, saved)
    assert sorted(ended) == ["a", "b"]  # both ended before the error left side_by_side; c never started


def test_an_interruption_inside_one_thread_stops_the_others() -> None:
    a_running = threading.Event()
    seen: list[str] = []

    def work(item: str, stop: threading.Event) -> None:
        if item == "a":
            a_running.set()
            assert stop.wait(WAIT)
            seen.append("a stopped")
            return
        assert a_running.wait(WAIT)
        raise KeyboardInterrupt("b's Tune loop was interrupted")

    with pytest.raises(KeyboardInterrupt, match="b's Tune loop"):
        side_by_side(["a", "b"], work, 2, poll_s=0.05)
    assert seen == ["a stopped"]


def test_state_records_from_threads_all_reach_the_file(tmp_path: Path) -> None:
    from brainalign.studies._state import StudyState

    state = StudyState(path=tmp_path / "study_state.json", study="s", fingerprint="f")
    go = threading.Barrier(4, timeout=WAIT)

    def writer(t: int) -> None:
        go.wait()
        for i in range(40):
            state.record("searches", f"t{t}-{i}", {"run_id": f"r{t}{i}", "done": True})
            state.record("finals", f"t{t}-{i}", {"run_id": f"f{t}{i}"})

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(WAIT)
    doc = json.loads(state.path.read_text())
    assert len(doc["searches"]) == len(doc["finals"]) == 160
    assert doc["searches"]["t3-39"] == {"run_id": "r339", "done": True}
    with pytest.raises(KeyError):
        state.record("other", "k", {})


def test_console_redirection_is_shared_by_threads_and_restored_once(tmp_path: Path) -> None:
    """Two searches' Tune output at once: what either prints while any of them runs goes to
    the log file, and the console comes back when the last one ends (nested
    ``redirect_stdout`` from two threads would leave ``sys.stdout`` on a closed file)."""
    from brainalign.studies._tune import _output_to

    log_file = tmp_path / "study.log"
    out, err = sys.stdout, sys.stderr
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with _output_to(log_file):
            print("first search table")
            a_in.set()
            assert b_in.wait(WAIT)  # both inside at once
        a_out.set()

    def second() -> None:
        assert a_in.wait(WAIT)
        with _output_to(log_file):
            b_in.set()
            assert a_out.wait(WAIT)  # the first one has left: the redirection must hold
            print("second search table")
            sys.stderr.write("second search warning\n")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(WAIT)
    assert (sys.stdout, sys.stderr) == (out, err)
    text = log_file.read_text()
    assert "first search table" in text and "second search table" in text and "second search warning" in text


def test_engine_stop_ends_only_the_loop_of_a_thread_whose_event_is_set() -> None:
    from brainalign.studies import _tune

    cb = pickle.loads(pickle.dumps(_tune.EngineStop()))  # pickled with the experiment, restored with it
    cb.on_step_begin(iteration=0, trials=[])  # no event: the main thread, Tune's own Ctrl-C
    stop = threading.Event()
    _tune._THREAD.stop = stop
    try:
        cb.on_step_begin(iteration=1, trials=[])
        stop.set()
        with pytest.raises(_tune._Stopped):
            cb.on_step_begin(iteration=2, trials=[])
        # an Exception, so that Tune's loop cleans up its trial actors before it propagates
        assert issubclass(_tune._Stopped, Exception)
    finally:
        _tune._THREAD.stop = None


def test_experiments_set_up_one_at_a_time_and_run_side_by_side() -> None:
    """Tune's trainable registry is not thread-safe (two searches registering at once fail with
    "dictionary changed size during iteration"): a search holds the set-up turn from building
    its Tuner until its loop's first step, then the next one may set up."""
    from brainalign.studies import _tune

    first_in, second_in, done = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with _tune._setup_turn():
            first_in.set()
            assert not second_in.wait(0.2)  # the turn is held while the first sets up
            _tune.EngineStop().on_step_begin(iteration=0, trials=[])  # its loop begins
            assert second_in.wait(WAIT)  # the second set up while the first still runs
        done.set()

    def second() -> None:
        assert first_in.wait(WAIT)
        with _tune._setup_turn():
            second_in.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(WAIT)
    assert done.is_set() and second_in.is_set() and not _tune._SETUP.locked()
