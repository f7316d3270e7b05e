#!/usr/bin/env bash
# Start a local Ray head (dashboard + job server) and an MLflow tracking server, both bound
# to 127.0.0.1, and record what was started in $CLUSTER_STATE_DIR so that cluster_down.sh
# stops exactly that and nothing else. See docs/cluster.md.
#
# Environment (all optional):
#   BRAINALIGN_HOME        root of the stores (mlruns/, cache/, ray_results/); default: repo root
#   CLUSTER_STATE_DIR      where PIDs, ports and logs are recorded; default: <repo>/.cluster
#   RAY_DASHBOARD_PORT     dashboard + job API (ray job submit --address http://127.0.0.1:PORT); 8265
#   RAY_GCS_PORT           GCS port of the head; 6379
#   RAY_NUM_CPUS           logical CPUs of the head; 4 (oversubscribed on purpose, see docs)
#   RAY_TEMP_DIR           Ray's temp/session dir; default /tmp/ray-ba-<dashboard port>. It must
#                          NOT be /tmp/ray: `ray start` writes <temp>/ray_current_cluster there,
#                          and every later plain `ray.init()` on this machine would join us.
#   MLFLOW_PORT            MLflow server port; 5000
#   RAY_AUTH_MODE          disabled (default; loopback only) or token (see docs/cluster.md)
#   CLUSTER_MULTI_NODE=1   opt-in: let other machines join this head. The GCS, raylet and agents then
#                          listen on CLUSTER_NODE_IP (default: Ray's pick of this machine's address),
#                          and token auth is required (RAY_AUTH_MODE=token; a token must exist). The
#                          dashboard/job API stays on 127.0.0.1 (port-forward it). See docs/cluster.md.
#   CLUSTER_NODE_IP        the address other machines reach this head on (multi-node only)
#   RAY_JOB_STOP_WAIT_TIME_S  grace between SIGTERM and SIGKILL on `ray job stop`; 15
#   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S  head's drain on SIGTERM (cluster-down); 5
#   CLUSTER_NO_MLFLOW=1    start only Ray
#   CLUSTER_START_TIMEOUT  seconds to wait for each service to answer; 300
#   CLUSTER_START_ATTEMPTS tries of `ray start` when its raylet times out (busy machine); 5
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$ROOT/.venv/bin/ray" ]]; then
    PATH="$ROOT/.venv/bin:$PATH"
fi
PY="$(command -v python3)"

BRAINALIGN_HOME="${BRAINALIGN_HOME:-$ROOT}"
mkdir -p "$BRAINALIGN_HOME"
BRAINALIGN_HOME="$(cd "$BRAINALIGN_HOME" && pwd)"
export BRAINALIGN_HOME
STATE_DIR="${CLUSTER_STATE_DIR:-$ROOT/.cluster}"
DASH_PORT="${RAY_DASHBOARD_PORT:-8265}"
GCS_PORT="${RAY_GCS_PORT:-6379}"
NUM_CPUS="${RAY_NUM_CPUS:-4}"
ML_PORT="${MLFLOW_PORT:-5000}"
TEMP_DIR="${RAY_TEMP_DIR:-/tmp/ray-ba-$DASH_PORT}"
START_TIMEOUT="${CLUSTER_START_TIMEOUT:-300}"  # MLflow's first start migrates the DB: slow on busy cores
# Token auth is decided per command from RAY_AUTH_MODE. Set it explicitly: with the variable
# unset, `ray start` turns token auth ON whenever ~/.ray/auth_token exists (any earlier local
# ray.init() writes one), while the job CLI does not send the token unless told to.
MULTI_NODE="${CLUSTER_MULTI_NODE:-0}"
if [[ "$MULTI_NODE" == 1 ]]; then
    # other machines can reach the head: never without a token
    [[ "${RAY_AUTH_MODE:-token}" == token ]] || {
        echo "cluster-up: CLUSTER_MULTI_NODE=1 requires token auth; RAY_AUTH_MODE=${RAY_AUTH_MODE} is refused." >&2
        exit 1
    }
    export RAY_AUTH_MODE=token
else
    # Bind everything to 127.0.0.1. Ray resolves --node-ip-address=127.0.0.1 to the machine's network
    # address (and then listens on all interfaces) unless multi-node support is off for the process:
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps 127.0.0.1 (ray._private.services.resolve_ip_for_localhost).
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
fi
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export RAY_USAGE_STATS_ENABLED=0
export RAY_JOB_STOP_WAIT_TIME_S="${RAY_JOB_STOP_WAIT_TIME_S:-15}"
# On SIGTERM the head first "drains" (waits for the node to go idle) for up to this long;
# Ray's 30 s default is always spent in full on a node with live actors. cluster_down.sh
# stops the jobs itself before it stops the head, so a short drain loses nothing.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-5}"
export MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK=true
STATE="$STATE_DIR/state.env"

die() { echo "cluster-up: $*" >&2; exit 1; }

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

port_free() {  # 0 if nothing listens on 127.0.0.1:$1
    "$PY" - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}

free_port() {  # an unused port (used for Ray's internal ports, so they cannot collide)
    "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

http_ok() {  # http_ok PORT PATH: 0 if GET http://127.0.0.1:PORT/PATH answers 200 (pure bash)
    timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" "$2" >&3
        read -r _ code _ <&3 && [[ "$code" == 200 ]]' _ "$1" "$2" 2>/dev/null
}

wait_ready() {  # wait_ready NAME PID PORT PATH [LOG LINE]: 0 ready, 1 process exited, 2 timed out
    local name=$1 pid=$2 port=$3 path=$4 log=${5:-} line=${6:-} end=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < end)); do
        kill -0 "$pid" 2>/dev/null || { echo "cluster-up: $name exited during start-up" >&2; return 1; }
        if { [[ -z "$line" ]] || grep -q "$line" "$log" 2>/dev/null; } && http_ok "$port" "$path"; then
            return 0
        fi
        sleep 1
    done
    echo "cluster-up: $name did not answer on port $port within ${START_TIMEOUT}s" >&2
    return 2
}

command -v ray >/dev/null || die "'ray' not found; run 'make install' or put the venv's bin/ on PATH."
case "$RAY_AUTH_MODE" in
    disabled) ;;
    token)  # fail now, not as an AuthenticationError at the first `ray job submit`
        [[ -n "${RAY_AUTH_TOKEN:-}" || -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]] \
            || die "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a token" \
                   "file, or create ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} with 'ray get-auth-token --generate'." ;;
    *) die "RAY_AUTH_MODE must be 'disabled' or 'token', got '$RAY_AUTH_MODE'." ;;
esac

mkdir -p "$STATE_DIR"
if [[ -f "$STATE" ]]; then
    # shellcheck disable=SC1090
    source "$STATE"
    if alive "${RAY_PID:-}" || alive "${MLFLOW_PID:-}"; then
        echo "cluster-up: already running (state in $STATE); 'make cluster-down' first to restart."
        cat "$STATE_DIR/env.sh"
        exit 0
    fi
    echo "cluster-up: removing stale state $STATE (its processes are gone)."
    # its temp dir was this script's own: clear its dead session so the check below passes
    if [[ -n "${RAY_TEMP_DIR:-}" && "$RAY_TEMP_DIR" == "$TEMP_DIR" && -e "$TEMP_DIR/session_latest" ]]; then
        rm -rf -- "$TEMP_DIR"
    fi
    rm -f "$STATE" "$STATE_DIR/env.sh"
fi

port_free "$DASH_PORT" || die "port $DASH_PORT (Ray dashboard) is in use; set RAY_DASHBOARD_PORT."
port_free "$GCS_PORT" || die "port $GCS_PORT (Ray GCS) is in use; set RAY_GCS_PORT."
if [[ "${CLUSTER_NO_MLFLOW:-0}" != 1 ]]; then
    port_free "$ML_PORT" || die "port $ML_PORT (MLflow) is in use; set MLFLOW_PORT."
    command -v mlflow >/dev/null || die "'mlflow' not found; run 'make install'."
fi
[[ "$TEMP_DIR" != /tmp/ray && "$TEMP_DIR" != /tmp/ray/ ]] \
    || die "RAY_TEMP_DIR must not be /tmp/ray (the default of every other Ray on this machine)."
# cluster-down reaps stragglers by this dir: never share it with a Ray this script did not start
[[ ! -e "$TEMP_DIR/session_latest" ]] \
    || die "RAY_TEMP_DIR $TEMP_DIR already holds a Ray session (another cluster, or a crashed one):" \
           "choose another RAY_TEMP_DIR, or remove the directory if no Ray uses it."

RAY_PID="" MLFLOW_PID=""
cleanup_on_error() {
    echo "cluster-up: start failed; stopping what this call started." >&2
    for pid in $MLFLOW_PID $RAY_PID; do
        kill -TERM -- "-$pid" 2>/dev/null || true
    done
    sleep 2
    for pid in $MLFLOW_PID $RAY_PID; do
        kill -KILL -- "-$pid" 2>/dev/null || true
    done
    rm -f "$STATE" "$STATE_DIR/env.sh"
    if [[ "${TEMP_DIR_CREATED:-0}" == 1 ]]; then
        rm -rf -- "$TEMP_DIR"
    fi
}
trap cleanup_on_error ERR

TEMP_DIR_CREATED=0
[[ -e "$TEMP_DIR" ]] || TEMP_DIR_CREATED=1
mkdir -p "$BRAINALIGN_HOME/mlruns/artifacts" "$TEMP_DIR"
MLFLOW_URI="http://127.0.0.1:$ML_PORT"

# Jobs inherit the head's environment: they log to this MLflow server and resolve relative
# data paths against BRAINALIGN_HOME unless the submitter overrides them (runtime_env env_vars).
if [[ "${CLUSTER_NO_MLFLOW:-0}" != 1 ]]; then
    export MLFLOW_TRACKING_URI="$MLFLOW_URI"
fi

# Ray's own in-cluster State API clients (e.g. Train V2's PlacementGroupCleaner) look the
# cluster up with no address; with two Ray instances on one machine (ours and anyone's
# `ray.init()`) that fails with "Found multiple active Ray instances". Every process of this
# head inherits the variable below, so they always find this cluster's dashboard.
export RAY_API_SERVER_ADDRESS="http://127.0.0.1:$DASH_PORT"

MLFLOW_PID=""
if [[ "${CLUSTER_NO_MLFLOW:-0}" != 1 ]]; then
    setsid mlflow server \
        --backend-store-uri "sqlite:///$BRAINALIGN_HOME/mlruns/mlflow.db" \
        --artifacts-destination "$BRAINALIGN_HOME/mlruns/artifacts" \
        --host 127.0.0.1 --port "$ML_PORT" --workers 1 \
        >"$STATE_DIR/mlflow.log" 2>&1 </dev/null &
    MLFLOW_PID=$!
fi

write_state() {
    cat >"$STATE" <<EOF
# written by scripts/cluster_up.sh at $(date -u +%FT%TZ); read by scripts/cluster_down.sh
RAY_PID=$RAY_PID
MLFLOW_PID=$MLFLOW_PID
RAY_DASHBOARD_PORT=$DASH_PORT
RAY_GCS_PORT=$GCS_PORT
MLFLOW_PORT=$ML_PORT
RAY_TEMP_DIR=$TEMP_DIR
RAY_TEMP_DIR_CREATED=$TEMP_DIR_CREATED
BRAINALIGN_HOME=$BRAINALIGN_HOME
RAY_AUTH_MODE=$RAY_AUTH_MODE
RAY_JOB_STOP_WAIT_TIME_S=$RAY_JOB_STOP_WAIT_TIME_S
EOF
}
write_state

# `--block` keeps one parent process that owns the head's daemons (GCS, raylet, dashboard);
# SIGTERM to it shuts down exactly this head. `setsid` puts it in its own process group, so
# cluster_down.sh can also reap leftovers by that group id. `ray stop` is never used: it
# kills every Ray process on the machine, by name, including other people's clusters.
if [[ "$MULTI_NODE" == 1 ]]; then
    NODE_IP_ARGS=()
    [[ -z "${CLUSTER_NODE_IP:-}" ]] || NODE_IP_ARGS=(--node-ip-address="$CLUSTER_NODE_IP")
else
    NODE_IP_ARGS=(--node-ip-address=127.0.0.1)
fi
start_ray() {
    setsid ray start --head --block \
        --num-cpus="$NUM_CPUS" \
        "${NODE_IP_ARGS[@]}" \
        --port="$GCS_PORT" \
        --include-dashboard=true \
        --dashboard-host=127.0.0.1 \
        --dashboard-port="$DASH_PORT" \
        --dashboard-agent-listen-port="$(free_port)" \
        --dashboard-agent-grpc-port="$(free_port)" \
        --runtime-env-agent-port="$(free_port)" \
        --metrics-export-port="$(free_port)" \
        --ray-client-server-port="$(free_port)" \
        --temp-dir="$TEMP_DIR" \
        --disable-usage-stats \
        >"$STATE_DIR/ray.log" 2>&1 </dev/null &
    RAY_PID=$!
    write_state
}

# Ray gives its raylet a fixed 30 s to register with the GCS; on an overloaded machine that
# can fail ("The current node timed out during startup"). The dashboard answers before that
# check, so readiness is "Ray runtime started" in the log AND the job API answering.
attempts="${CLUSTER_START_ATTEMPTS:-5}"
for ((attempt = 1; ; attempt++)); do
    start_ray
    rc=0
    wait_ready "Ray head" "$RAY_PID" "$DASH_PORT" /api/version "$STATE_DIR/ray.log" "Ray runtime started" || rc=$?
    ((rc == 0)) && break
    if ((rc == 1 && attempt < attempts)) && grep -q "timed out during startup" "$STATE_DIR/ray.log"; then
        echo "cluster-up: Ray head start timed out (busy machine?); retry $((attempt + 1))/$attempts" >&2
        kill -KILL -- "-$RAY_PID" 2>/dev/null || true
        cp "$STATE_DIR/ray.log" "$STATE_DIR/ray.attempt$attempt.log"
        sleep $((5 * attempt))  # back off: the machine is busy
        continue
    fi
    tail -n 30 "$STATE_DIR/ray.log" >&2
    false
done
if [[ -n "$MLFLOW_PID" ]]; then
    wait_ready "MLflow server" "$MLFLOW_PID" "$ML_PORT" /health \
        || { tail -n 30 "$STATE_DIR/mlflow.log" >&2; false; }
fi
trap - ERR

cat >"$STATE_DIR/env.sh" <<EOF
# source this file to talk to the cluster started by scripts/cluster_up.sh
export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$DASH_PORT
export RAY_AUTH_MODE=$RAY_AUTH_MODE
export BRAINALIGN_HOME=$BRAINALIGN_HOME
export PATH=$(dirname "$(command -v ray)"):\$PATH
EOF
if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH" >>"$STATE_DIR/env.sh"
fi
if [[ -n "$MLFLOW_PID" ]]; then
    echo "export MLFLOW_TRACKING_URI=$MLFLOW_URI" >>"$STATE_DIR/env.sh"
fi

echo "cluster-up: Ray head pid $RAY_PID, dashboard/jobs http://127.0.0.1:$DASH_PORT (auth: $RAY_AUTH_MODE)"
if [[ "$MULTI_NODE" == 1 ]]; then
    echo "cluster-up: multi-node: on each worker machine run (with the same token):"
    echo "  RAY_AUTH_MODE=token ray start --address=${CLUSTER_NODE_IP:-<this machine address>}:$GCS_PORT"
else
    echo "cluster-up: every port listens on 127.0.0.1 only (CLUSTER_MULTI_NODE=1 to let other machines join)"
fi
[[ -n "$MLFLOW_PID" ]] && echo "cluster-up: MLflow pid $MLFLOW_PID, $MLFLOW_URI (store: $BRAINALIGN_HOME/mlruns)"
echo "cluster-up: state in $STATE; 'source $STATE_DIR/env.sh' to use it."
