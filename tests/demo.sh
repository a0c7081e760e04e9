#!/usr/bin/env bash
# `make demo`: the grid end to end on this machine, with real processes.
#
#   1. A controller starts (SQLite store and logs in a temporary directory,
#      one bearer token per role).
#   2. Two agents start (process runtime: subtasks run as host processes in
#      each agent's own low-priority cgroup partition) and register.
#   3. `sparegrid hosts` shows them; `sparegrid submit --watch` sends the
#      sample job (workloads/jobs/sample.toml: count the primes below
#      200,000 in 20 subtasks) and follows it with a progress bar.
#   4. It prints what each subtask printed, in order (the API's map stage),
#      and `sparegrid results` (the job's reduce step: the total); the demo
#      checks that every subtask is there exactly once.
#   5. Everything stops; the temporary directory and the cgroup partitions
#      are removed (DEMO_KEEP=1 keeps the directory).
#
# Exits 0 only when the results are complete. Needs root (cgroups) and the
# built binaries; `make demo` provides both. DEMO_PORT (default 7480) is the
# controller's port, the agents take the next two; DEMO_JOB names another
# job file.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BIN=${SPAREGRID_BIN_DIR:-target/debug}
CONTROLLER=$BIN/sparegrid-controller
AGENT=$BIN/sparegrid-agent
CLI=$BIN/sparegrid
SAMPLE=workloads/jobs/sample.toml
JOB=${DEMO_JOB:-$SAMPLE}
PORT=${DEMO_PORT:-7480}
AGENTS=2
WORK=$(mktemp -d /tmp/sparegrid-demo.XXXXXX)
CONTROLLER_PID=
AGENT_PIDS=()
PARTITIONS=()
OK=0

bold() { printf '\033[1m%s\033[0m\n' "$*"; }
say() { printf '\n'; bold "== $*"; }
note() { printf '   %s\n' "$*"; }
logs() {
    echo "--- controller log (tail) ---" >&2
    tail -n 25 "$WORK/controller.log" >&2 2>/dev/null || true
    for i in $(seq "$AGENTS"); do
        echo "--- agent $i log (tail) ---" >&2
        tail -n 15 "$WORK/agent-$i.log" >&2 2>/dev/null || true
    done
}
fail() { echo "demo: FAILED: $*" >&2; logs; exit 1; }

# Removes a cgroup partition from every hierarchy, children first; frozen
# tasks are thawed and anything left inside is killed.
remove_partition() {
    local part=$1 d
    for d in $(find /sys/fs/cgroup -maxdepth 2 -type d -name "$part" 2>/dev/null); do
        find "$d" -depth -type d 2>/dev/null | while read -r g; do
            [ -f "$g/freezer.state" ] && { echo THAWED >"$g/freezer.state"; } 2>/dev/null || true
            [ -f "$g/cgroup.freeze" ] && { echo 0 >"$g/cgroup.freeze"; } 2>/dev/null || true
            for _ in 1 2 3 4 5 6 7 8 9 10; do
                for p in $(cat "$g/cgroup.procs" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
                rmdir "$g" 2>/dev/null && break
                [ -d "$g" ] || break
                sleep 0.2
            done
        done
    done
}

stop() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local pid part
    for pid in "${AGENT_PIDS[@]}"; do stop "$pid"; done
    [ -n "$CONTROLLER_PID" ] && stop "$CONTROLLER_PID"
    for part in "${PARTITIONS[@]}"; do remove_partition "$part"; done
    for part in "${PARTITIONS[@]}"; do
        if find /sys/fs/cgroup -maxdepth 2 -type d -name "$part" 2>/dev/null | grep -q .; then
            echo "demo: could not remove cgroup partition $part" >&2
        fi
    done
    if [ "${DEMO_KEEP:-0}" = 1 ]; then
        echo "demo: files kept in $WORK"
    else
        rm -rf "$WORK"
    fi
    [ "$OK" = 1 ] && echo && bold "demo: OK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || fail "needs root (the agents create cgroup partitions); run 'make demo' as root"
for f in "$CONTROLLER" "$AGENT" "$CLI"; do
    [ -x "$f" ] || fail "$f is missing (run 'make demo', which builds it)"
done
[ -f "$JOB" ] || fail "job file $JOB does not exist"
for c in jq curl; do command -v $c >/dev/null || fail "$c is missing (make deps installs it)"; done
for p in $(seq "$PORT" $((PORT + AGENTS))); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        fail "port $p is in use; set DEMO_PORT to a free range"
    fi
done

token() { head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
AGENT_TOKEN=$(token)
SUBMIT_TOKEN=$(token)
ADMIN_TOKEN=$(token)
export SPAREGRID_CONTROLLER="http://127.0.0.1:$PORT"
export SPAREGRID_TOKEN=$SUBMIT_TOKEN
sg() { "$CLI" "$@"; }
sg_admin() { "$CLI" --token "$ADMIN_TOKEN" "$@"; }

# ---------------------------------------------------------------------------
say "1. Start the controller on 127.0.0.1:$PORT"
cat >"$WORK/controller.toml" <<TOML
listen = "127.0.0.1:$PORT"
db_path = "$WORK/controller.db"

[registry]
heartbeat_interval = "500ms"
host_timeout = "10s"

[auth]
agent_token = "$AGENT_TOKEN"
submit_tokens = ["$SUBMIT_TOKEN"]
admin_tokens = ["$ADMIN_TOKEN"]
TOML
"$CONTROLLER" --config "$WORK/controller.toml" run >"$WORK/controller.log" 2>&1 &
CONTROLLER_PID=$!
for _ in $(seq 100); do
    sg_admin hosts >/dev/null 2>&1 && break
    kill -0 "$CONTROLLER_PID" 2>/dev/null || fail "the controller exited"
    sleep 0.1
done
sg_admin hosts >/dev/null || fail "the controller does not answer"
note "store: $WORK/controller.db; tokens for the agent, submit and admin roles"

# ---------------------------------------------------------------------------
say "2. Start $AGENTS agents (process runtime, 2 slots each)"
note "Both agents share this machine, so each would count the other's subtasks"
note "as customer CPU load: the demo agents weigh memory only (a real host"
note "weighs every metric)."
for i in $(seq "$AGENTS"); do
    part="sparegrid-demo-$$-$i"
    PARTITIONS+=("$part")
    mkdir -p "$WORK/agent-$i/run" "$WORK/agent-$i/data"
    cat >"$WORK/agent-$i.toml" <<TOML
[agent]
host_name = "demo-agent-$i"
listen = "127.0.0.1:$((PORT + i))"
run_dir = "$WORK/agent-$i/run"
data_dir = "$WORK/agent-$i/data"

[load.weights]
cpu = 0.0
load_avg = 0.0
memory = 1.0
network = 0.0
disk = 0.0
psi_cpu = 0.0
psi_memory = 0.0
psi_io = 0.0
rtt = 0.0

[policy]
# No grid VMs of their own: the agents only run the subtasks pushed to them.
max_grid_vms = 0

[cgroup]
partition = "$part"

[runtime]
kind = "process"

[controller]
url = "http://127.0.0.1:$PORT"
token = "$AGENT_TOKEN"
slots = 2
TOML
    "$AGENT" --config "$WORK/agent-$i.toml" run >"$WORK/agent-$i.log" 2>&1 &
    AGENT_PIDS+=($!)
done
eligible=0
for _ in $(seq 150); do
    eligible=$(sg_admin --json hosts 2>/dev/null | jq '[.hosts[] | select(.eligible)] | length' || echo 0)
    [ "$eligible" = "$AGENTS" ] && break
    for pid in "${AGENT_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || fail "an agent exited"; done
    sleep 0.2
done
[ "$eligible" = "$AGENTS" ] || fail "only $eligible of $AGENTS agents became eligible within 30 s"

say "3. sparegrid hosts"
sg_admin hosts

# ---------------------------------------------------------------------------
say "4. sparegrid submit $JOB --watch"
grep -E '^(name|end|chunk|start) ' "$JOB" | sed 's/^/   /' || true
note "(grid work runs at the lowest CPU priority: on a busy machine it waits for spare CPU)"
sg submit "$JOB" --watch || fail "the job did not finish"
ID=$(sg --json status --limit 1 | jq -r '.jobs[0].id')
[ -n "$ID" ] && [ "$ID" != null ] || fail "cannot find the submitted job"

say "5. sparegrid hosts (after the job)"
# `running` is what each agent last reported: give them a heartbeat or two.
for _ in $(seq 25); do
    [ "$(sg_admin --json hosts | jq '[.hosts[].running] | add')" = 0 ] && break
    sleep 0.2
done
sg_admin hosts

# The map outputs come from the API (?stage=map); `sparegrid results` gives
# the reduce's output when the job has a reduce step, else the map outputs.
curl -sf -H "Authorization: Bearer $SUBMIT_TOKEN" \
    "$SPAREGRID_CONTROLLER/v1/jobs/$ID/results?stage=map&format=json" >"$WORK/map.json" \
    || fail "cannot read the map results of $ID"
sg --json status "$ID" >"$WORK/status.json" || fail "cannot read job $ID"
N=$(jq '.map_subtasks' "$WORK/status.json")
HAS_REDUCE=$(jq '.reduce != null' "$WORK/status.json")

say "6. Each subtask's output, in subtask order (GET /v1/jobs/$ID/results?stage=map)"
jq -r '.results[] | "\(.index)\t\(.host)\t\(.stdout | rtrimstr("\n"))"' "$WORK/map.json" \
    | awk -F'\t' '{ printf "   #%-3s %-13s %s\n", $1, $2, $3 }'

if [ "$HAS_REDUCE" = true ]; then
    say "7. sparegrid results $ID (the reduce step: one run over all the outputs)"
else
    say "7. sparegrid results $ID"
fi
sg results "$ID" >"$WORK/results.txt" || fail "sparegrid results $ID failed"
sed 's/^/   /' "$WORK/results.txt"

# ---------------------------------------------------------------------------
say "8. Check: every subtask exactly once"
CHECK=$(jq --argjson n "$N" '
    [.results[].index] as $ix
    | {complete, results: (.results | length), unique: ($ix | unique | length),
       in_order: ($ix == [range(0; $n)]),
       failed: ([.results[] | select(.exit_code != 0)] | length),
       hosts: ([.results[].host] | group_by(.) | map({(.[0]): length}) | add)}' \
    "$WORK/map.json")
note "$(echo "$CHECK" | jq -c .)"
echo "$CHECK" | jq -e --argjson n "$N" \
    '.complete and .results == $n and .unique == $n and .in_order and .failed == 0' >/dev/null \
    || fail "results are not complete: $CHECK"
[ "$(jq -r '.state' "$WORK/status.json")" = done ] || fail "job $ID is $(jq -r .state "$WORK/status.json")"
if [ "$HAS_REDUCE" = true ]; then
    [ "$(jq -r '.reduce' "$WORK/status.json")" = done ] || fail "the reduce step is not done"
fi
if [ "$JOB" = "$SAMPLE" ]; then
    SUM=$(jq -r '.results[].stdout' "$WORK/map.json" | awk '{ n += $NF } END { print n }')
    [ "$SUM" = 17984 ] || fail "the subtasks' counts add up to $SUM, not 17984"
    grep -q "primes below 200000: 17984 " "$WORK/results.txt" \
        || fail "the reduce output is not the known count 17984: $(cat "$WORK/results.txt")"
    note "the counts add up to 17984, the known number of primes below 200,000"
fi
note "$N of $N subtasks, each exactly once"

say "9. Stop the agents and the controller"
for pid in "${AGENT_PIDS[@]}"; do stop "$pid"; done
AGENT_PIDS=()
stop "$CONTROLLER_PID"
CONTROLLER_PID=
note "stopped; cleaning up $WORK and the cgroup partitions"
OK=1
