#!/usr/bin/env bash
# `make demo`: the grid end to end on this machine, with real processes.
#
#   1. A controller starts (SQLite store and logs in a temporary directory,
#      one bearer token per role).
#   2. Two agents start (libvirt runtime on this machine's libvirtd): each
#      boots one grid VM (TCG) from the guest image and registers once the
#      VM's guest worker has answered on its channel.
#   3. `sparegrid hosts` shows them; `sparegrid submit` sends the sample job
#      (workloads/jobs/sample.toml: count the primes below 200,000 in 20
#      subtasks plus a reduce); every subtask runs inside a grid VM. While it
#      runs the demo prints each grid VM's state as it changes (from the
#      agents' GET /v1/status: VM state, guest link state, the subtask it
#      runs) and the job's progress.
#   4. It prints what each subtask printed, in order (the API's map stage),
#      and `sparegrid results` (the job's reduce step: the total); the demo
#      checks that every subtask is there exactly once.
#   5. The agents drain (their VMs are destroyed), everything stops; the
#      temporary directory, the cgroup partitions and any grid domain left
#      behind are removed (DEMO_KEEP=1 keeps the directory).
#
# Exits 0 only when the results are complete. Needs root, a running libvirtd,
# the guest image (SPAREGRID_IMAGE_DIR, default
# /var/lib/sparegrid/images/default) and the built binaries; `make demo`
# provides all of them. DEMO_PORT (default 7480) is the controller's port,
# the agents take the next two; DEMO_JOB names another job file.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BIN=${SPAREGRID_BIN_DIR:-target/debug}
CONTROLLER=$BIN/sparegrid-controller
AGENT=$BIN/sparegrid-agent
CLI=$BIN/sparegrid
SAMPLE=workloads/jobs/sample.toml
JOB=${DEMO_JOB:-$SAMPLE}
PORT=${DEMO_PORT:-7480}
IMAGE=${SPAREGRID_IMAGE_DIR:-/var/lib/sparegrid/images/default}
VIRSH="virsh -c qemu:///system"
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

# Grid domains of the demo's agents that are still defined (an agent that
# was killed leaves them): destroyed and undefined with their save images.
remove_domains() {
    local d
    for d in $($VIRSH list --all --name 2>/dev/null | grep "^sg-demo-agent-$$-" || true); do
        $VIRSH destroy "$d" >/dev/null 2>&1 || true
        $VIRSH undefine "$d" --managed-save >/dev/null 2>&1 || true
    done
}

cleanup() {
    local pid part
    for pid in "${AGENT_PIDS[@]}"; do stop "$pid"; done
    [ -n "$CONTROLLER_PID" ] && stop "$CONTROLLER_PID"
    remove_domains
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

[ "$(id -u)" = 0 ] || fail "needs root (libvirt, cgroup partitions); run 'make demo' as root"
for f in "$CONTROLLER" "$AGENT" "$CLI"; do
    [ -x "$f" ] || fail "$f is missing (run 'make demo', which builds it)"
done
for f in "$IMAGE/vmlinuz" "$IMAGE/initrd.img" "$IMAGE/manifest.json"; do
    [ -f "$f" ] || fail "$f is missing (run 'make demo', which builds the guest image)"
done
$VIRSH version >/dev/null 2>&1 || fail "libvirtd does not answer on qemu:///system (run 'make demo', which starts it)"
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
say "2. Start $AGENTS agents (libvirt runtime: one grid VM each, TCG)"
note "Each agent boots a grid VM from $IMAGE (kernel + initramfs with"
note "busybox and the sparegrid-guest worker) and offers a slot once the"
note "worker has said Hello on the VM's virtio-serial channel. Both agents share"
note "this machine, so each would count the other's VM as customer CPU load:"
note "the demo agents weigh memory only (a real host weighs every metric)."
# QEMU (user libvirt-qemu) must reach the run directories.
chmod 755 "$WORK"
for i in $(seq "$AGENTS"); do
    part="sparegrid-demo-$$-$i"
    PARTITIONS+=("$part")
    mkdir -p "$WORK/agent-$i/run" "$WORK/agent-$i/data"
    chmod 755 "$WORK/agent-$i" "$WORK/agent-$i/run"
    cat >"$WORK/agent-$i.toml" <<TOML
[agent]
host_name = "demo-agent-$$-$i"
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
launch_after = "1s"
boot_timeout = "300s"
memory_reserve_mib = 256
max_grid_vms = 1
memory_budget_mib = 256
vcpu_budget = 1

[cgroup]
partition = "$part"

[runtime]
kind = "libvirt"
libvirt_uri = "qemu:///system"
# Nested KVM guests do not boot on every machine; TCG always does.
domain_type = "qemu"

[vm]
vcpus = 1
memory_mib = 256
kernel = "$IMAGE/vmlinuz"
initrd = "$IMAGE/initrd.img"

[controller]
url = "http://127.0.0.1:$PORT"
token = "$AGENT_TOKEN"
slots = 1
TOML
    "$AGENT" --config "$WORK/agent-$i.toml" run >"$WORK/agent-$i.log" 2>&1 &
    AGENT_PIDS+=($!)
done

# vm_lines: one line per grid VM of every agent: agent, VM, state, guest
# link state, subtask.
vm_lines() {
    local i
    for i in $(seq "$AGENTS"); do
        curl -sf "http://127.0.0.1:$((PORT + i))/v1/status" 2>/dev/null \
            | jq -r --arg a "agent-$i" '.vms[] | "\($a)  \(.name)  \(.state)  guest=\(.guest // "-")  \(.subtask // "")"' \
            || true
    done
}
# show_vm_changes: prints the VM lines that changed since the last call.
LAST_VMS=""
show_vm_changes() {
    local now
    now=$(vm_lines | sort)
    if [ "$now" != "$LAST_VMS" ]; then
        # VMs that left the agents' tables (reclaimed), then new or changed lines.
        comm -23 <(echo "$LAST_VMS" | awk '{ print $1 "  " $2 }' | sort -u) \
            <(echo "$now" | awk '{ print $1 "  " $2 }' | sort -u) \
            | sed '/^ *$/d; s/^/   vm: /; s/$/  gone/'
        comm -13 <(echo "$LAST_VMS") <(echo "$now") | sed '/^$/d; s/^/   vm: /'
        LAST_VMS=$now
    fi
}
ready=0
for _ in $(seq 1500); do
    ready=$(sg_admin --json hosts 2>/dev/null | jq '[.hosts[] | select(.eligible and .free_slots > 0)] | length' || echo 0)
    show_vm_changes
    [ "$ready" = "$AGENTS" ] && break
    for pid in "${AGENT_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || fail "an agent exited"; done
    sleep 0.2
done
[ "$ready" = "$AGENTS" ] || fail "only $ready of $AGENTS agents had a ready grid VM within 300 s"

say "3. sparegrid hosts"
sg_admin hosts

# ---------------------------------------------------------------------------
say "4. sparegrid submit $JOB"
grep -E '^(name|end|chunk|start) ' "$JOB" | sed 's/^/   /' || true
note "Each subtask runs inside a grid VM; below, every change of a VM's state"
note "(vm: agent, VM, state, guest link, subtask) and of the job's progress."
ID=$(sg --json submit "$JOB" | jq -r '.id') || fail "the job was not accepted"
[ -n "$ID" ] && [ "$ID" != null ] || fail "cannot read the submitted job's id"
note "job $ID"
LAST_PROGRESS=""
STATE=""
for _ in $(seq 3000); do
    show_vm_changes
    sg --json status "$ID" >"$WORK/status.json" 2>/dev/null || true
    STATE=$(jq -r '.state // ""' "$WORK/status.json" 2>/dev/null || true)
    PROGRESS=$(jq -r '"job: \(.state), \(.counts.done // 0)/\(.counts.total // 0) subtasks done, \(.counts.assigned // 0) running, reduce \(.reduce // "-")"' "$WORK/status.json" 2>/dev/null || true)
    if [ -n "$PROGRESS" ] && [ "$PROGRESS" != "$LAST_PROGRESS" ]; then
        echo "   $PROGRESS"
        LAST_PROGRESS=$PROGRESS
    fi
    case $STATE in done | failed | cancelled) break ;; esac
    for pid in "${AGENT_PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || fail "an agent exited"; done
    sleep 0.2
done
[ "$STATE" = done ] || fail "job $ID ended as '${STATE:-unknown}' (or did not finish within 10 min)"

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

say "9. Drain the agents (their grid VMs are destroyed), stop everything"
for i in $(seq "$AGENTS"); do
    curl -sf -X POST "http://127.0.0.1:$((PORT + i))/v1/drain" >/dev/null || true
done
for _ in $(seq 100); do
    show_vm_changes
    [ -z "$(vm_lines)" ] && break
    sleep 0.2
done
for pid in "${AGENT_PIDS[@]}"; do stop "$pid"; done
AGENT_PIDS=()
stop "$CONTROLLER_PID"
CONTROLLER_PID=
note "stopped; cleaning up $WORK and the cgroup partitions"
OK=1
