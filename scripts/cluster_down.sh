#!/usr/bin/env bash
# Stop exactly what scripts/cluster_up.sh started, as recorded in $CLUSTER_STATE_DIR/state.env.
# Nothing else is touched: no `ray stop` (it kills every Ray process on the machine by name),
# no pkill. A PID from the state file is signalled only if its command line still proves it is
# ours (a reused PID is left alone). See docs/cluster.md.
#
# Environment: CLUSTER_STATE_DIR (default <repo>/.cluster), CLUSTER_STOP_TIMEOUT (45 s of
# grace before SIGKILL), CLUSTER_KEEP_TEMP=1 keeps Ray's temp dir (session logs).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${CLUSTER_STATE_DIR:-$ROOT/.cluster}"
STATE="$STATE_DIR/state.env"
TIMEOUT="${CLUSTER_STOP_TIMEOUT:-45}"
if [[ -x "$ROOT/.venv/bin/python3" ]]; then
    PATH="$ROOT/.venv/bin:$PATH"
fi

if [[ ! -f "$STATE" ]]; then
    echo "cluster-down: no state in $STATE_DIR; nothing was started by cluster-up, nothing to stop."
    exit 0
fi
RAY_PID="" MLFLOW_PID="" RAY_TEMP_DIR="" RAY_TEMP_DIR_CREATED=0 MLFLOW_PORT="" RAY_DASHBOARD_PORT=""
RAY_AUTH_MODE=disabled RAY_JOB_STOP_WAIT_TIME_S=15
# shellcheck disable=SC1090
source "$STATE"

cmdline() { tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" || true; }
# A zombie still answers kill -0; count it as gone (its parent may never reap it).
alive() {
    [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null || return 1
    local line state
    read -r line 2>/dev/null <"/proc/$1/stat" || return 1
    read -r state _ <<<"${line##*) }"
    [[ "$state" != Z ]]
}
group_alive() {  # any non-zombie member left in process group $1
    [[ -n "${1:-}" ]] || return 1
    local d line state ppid pgrp
    for d in /proc/[0-9]*; do
        read -r line 2>/dev/null <"$d/stat" || continue
        read -r state ppid pgrp _ <<<"${line##*) }"  # fields after "(comm)"; comm may hold spaces
        [[ "$pgrp" == "$1" && "$state" != Z ]] && return 0
    done
    return 1
}

wait_gone() {  # wait_gone SECONDS CHECK ARG: until CHECK ARG fails
    local end=$((SECONDS + $1))
    while "$2" "$3"; do
        ((SECONDS < end)) || return 1
        sleep 0.5
    done
}

stop_group() {  # stop_group NAME PGID: TERM the leader, then the group, then KILL the group
    local name=$1 pgid=$2
    if alive "$pgid"; then
        kill -TERM "$pgid" 2>/dev/null || true
        wait_gone "$TIMEOUT" alive "$pgid" || echo "cluster-down: $name ($pgid) ignored SIGTERM for ${TIMEOUT}s"
    fi
    if group_alive "$pgid"; then
        kill -TERM -- "-$pgid" 2>/dev/null || true
        wait_gone 5 group_alive "$pgid" || kill -KILL -- "-$pgid" 2>/dev/null || true
    fi
    echo "cluster-down: stopped $name (pid/pgid $pgid)"
}

# 1. Stop running jobs through the job API first: each driver gets SIGTERM and ends its MLflow
#    runs KILLED. Killing the head under a running job would leave its runs RUNNING.
if [[ -n "$RAY_PID" && -n "$RAY_DASHBOARD_PORT" ]] && alive "$RAY_PID"; then
    RAY_AUTH_MODE="$RAY_AUTH_MODE" timeout $((RAY_JOB_STOP_WAIT_TIME_S + 90)) python3 - \
        "http://127.0.0.1:$RAY_DASHBOARD_PORT" "$RAY_JOB_STOP_WAIT_TIME_S" <<'PY' \
        || echo "cluster-down: could not stop the jobs (continuing)"
import sys, time
from ray.job_submission import JobStatus, JobSubmissionClient

client = JobSubmissionClient(sys.argv[1])
live = [j.submission_id for j in client.list_jobs()
        if j.submission_id and j.status in (JobStatus.PENDING, JobStatus.RUNNING)]
for sid in live:
    print(f"cluster-down: stopping job {sid}")
    client.stop_job(sid)
end = time.time() + float(sys.argv[2]) + 30
while live and time.time() < end:
    live = [s for s in live if not client.get_job_status(s).is_terminal()]
    time.sleep(1)
if live:
    print(f"cluster-down: jobs still stopping: {live}")
PY
fi

# 2. The MLflow server, then the Ray head.
if [[ -n "$MLFLOW_PID" ]]; then
    if alive "$MLFLOW_PID" && [[ "$(cmdline "$MLFLOW_PID")" != *"mlflow"*"--port $MLFLOW_PORT"* ]]; then
        echo "cluster-down: pid $MLFLOW_PID is no longer our MLflow server; leaving it alone."
    else
        stop_group "MLflow server" "$MLFLOW_PID"
    fi
fi

if [[ -n "$RAY_PID" ]]; then
    if alive "$RAY_PID" && [[ "$(cmdline "$RAY_PID")" != *"--block"*"--temp-dir=$RAY_TEMP_DIR"* ]]; then
        echo "cluster-down: pid $RAY_PID is no longer our Ray head; leaving it alone."
    else
        # SIGTERM makes `ray start --block` shut down its own daemons (GCS, raylet, dashboard).
        stop_group "Ray head" "$RAY_PID"
    fi
fi

# Workers and job drivers run in their own process groups and exit when their raylet goes.
# Anything still alive that names OUR temp dir (unique to this cluster) is a straggler of it.
if [[ -n "$RAY_TEMP_DIR" && "$RAY_TEMP_DIR" != /tmp/ray ]]; then
    sleep 1
    left=()
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        [[ "$pid" == "$$" ]] && continue
        c="$(cmdline "$pid")"
        [[ "$c" == *"$RAY_TEMP_DIR/"* || "$c" == *"$RAY_TEMP_DIR "* ]] && left+=("$pid")
    done
    if ((${#left[@]})); then
        echo "cluster-down: ${#left[@]} leftover process(es) of this cluster: ${left[*]}; terminating."
        kill -TERM "${left[@]}" 2>/dev/null || true
        sleep 3
        kill -KILL "${left[@]}" 2>/dev/null || true
    fi
    if [[ "$RAY_TEMP_DIR_CREATED" == 1 && "${CLUSTER_KEEP_TEMP:-0}" != 1 ]]; then
        rm -rf -- "$RAY_TEMP_DIR"
    fi
fi

rm -f "$STATE" "$STATE_DIR/env.sh"
echo "cluster-down: done."
