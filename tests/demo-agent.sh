#!/usr/bin/env bash
# `make demo-agent`: the agent's main job, end to end, on a real libvirtd with a TCG
# grid VM. Every step is checked; the script fails loudly if one does not
# happen in time.
#
#   1. `sparegrid-agent check` reports what the host supports.
#   2. The agent launches a grid VM on spare capacity. The guest burns its
#      vCPU, and the VM keeps running: the grid's own load is subtracted.
#   3. A customer load step (stress-ng, outside the grid partition): the VM
#      is paused at once (cpu_pressure), libvirt says "paused".
#   4. The load ends: after resume_after the VM runs again (idle).
#   5. The load comes back and stays: the VM is reclaimed after reclaim_after
#      (suspended_too_long) and its domain is gone.
#   6. SIGTERM: the agent drains and exits 0.
#
# Needs root, libvirtd, the guest image (SPAREGRID_IMAGE_DIR) and a built
# agent; `make demo-agent` provides all of them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

AGENT=${SPAREGRID_AGENT_BIN:-target/debug/sparegrid-agent}
IMAGE=${SPAREGRID_IMAGE_DIR:-/var/lib/sparegrid/images/default}
PORT=${DEMO_PORT:-7471}
HOST=demo-$$
PARTITION=sparegrid-demo-$$
WORK=$(mktemp -d /tmp/sparegrid-demo.XXXXXX)
chmod 0755 "$WORK"
LOG=$WORK/agent.log
AGENT_PID=
LOAD_PID=

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() { echo "demo: FAILED: $*" >&2; echo "--- agent log (tail) ---" >&2; tail -n 30 "$LOG" >&2 || true; exit 1; }
cleanup() {
    [ -n "$LOAD_PID" ] && kill "$LOAD_PID" 2>/dev/null || true
    if [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; then kill -TERM "$AGENT_PID"; wait "$AGENT_PID" || true; fi
    for d in $(virsh -c qemu:///system list --all --name 2>/dev/null | grep "^sg-$HOST-" || true); do
        virsh -c qemu:///system destroy "$d" >/dev/null 2>&1 || true
        virsh -c qemu:///system undefine "$d" --managed-save >/dev/null 2>&1 || true
    done
    # The grid partition (libvirt names its own `<name>.partition`), children
    # first; the agent and libvirt are done with it by now.
    for d in $(find /sys/fs/cgroup -maxdepth 2 -type d \( -name "$PARTITION" -o -name "$PARTITION.partition" \) 2>/dev/null); do
        find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || echo "demo: cannot remove cgroup $d" >&2
    done
    echo "demo: files kept in $WORK"
}
trap cleanup EXIT

for f in "$AGENT" "$IMAGE/vmlinuz" "$IMAGE/initrd.img"; do
    [ -e "$f" ] || fail "$f is missing (run 'make demo-agent', which builds it)"
done
command -v jq >/dev/null || fail "jq is missing (make deps installs it)"
command -v stress-ng >/dev/null || fail "stress-ng is missing (make deps installs it)"
NCPU=$(nproc)

cat > "$WORK/agent.toml" <<TOML
[agent]
host_name = "$HOST"
listen = "127.0.0.1:$PORT"
run_dir = "$WORK/run"
data_dir = "$WORK/data"

[sampler]
interval = "250ms"

[load]
decay = "1s"

[load.weights]
# The 1-minute load average stays high for a minute after each load step,
# which would make this demo slow; everything else keeps its default weight.
load_avg = 0.0

[policy]
suspend_above = 0.6
resume_below = 0.4
resume_after = "3s"
launch_below = 0.4
launch_after = "2s"
reclaim_after = "12s"
boot_timeout = "120s"
memory_reserve_mib = 512
max_grid_vms = 1

[cgroup]
partition = "$PARTITION"

[runtime]
kind = "libvirt"
libvirt_uri = "qemu:///system"
domain_type = "auto"

[vm]
vcpus = 1
memory_mib = 256
kernel = "$IMAGE/vmlinuz"
initrd = "$IMAGE/initrd.img"
cmdline = "console=ttyS0 quiet panic=-1 sparegrid.burn=1"
TOML

status() { curl -sf "http://127.0.0.1:$PORT/v1/status"; }
show() {
    status | jq -r '"  load \(.load.smoothed // 0 | . * 100 | floor)% (dominant: \(.load.dominant // "-"))  vms: \([.vms[] | "\(.name)=\(.state)"] | join(", ") | if . == "" then "none" else . end)"'
}
# wait_until <seconds> <description> <jq filter that is true when done>
wait_until() {
    local secs=$1 what=$2 filter=$3 deadline=$((SECONDS + $1)) last=0
    while [ $SECONDS -lt $deadline ]; do
        if status | jq -e "$filter" >/dev/null 2>&1; then show; return 0; fi
        if [ $((SECONDS - last)) -ge 2 ]; then show || true; last=$SECONDS; fi
        kill -0 "$AGENT_PID" 2>/dev/null || fail "the agent exited"
        sleep 0.5
    done
    fail "$what: not within ${secs}s"
}
vm_in() { echo "[.vms[] | select(.state == \"$1\")] | length == 1"; }
last_reason() { echo "[.transitions[] | select(.to == \"$1\")] | last | .reason == \"$2\""; }
vm_name() { status | jq -r '.vms[0].name'; }

say "1. What this host supports"
"$AGENT" --config "$WORK/agent.toml" check || fail "sparegrid-agent check found a failure"

say "2. Start the agent; it launches a grid VM on spare capacity"
"$AGENT" --config "$WORK/agent.toml" >"$LOG" 2>&1 &
AGENT_PID=$!
wait_until 20 "agent answers" '.host != null'
wait_until 180 "grid VM running" "$(vm_in running)"
VM=$(vm_name)
echo "  grid VM $VM is running; its guest burns its vCPU. Holding 5 s: its own load must not suspend it."
for _ in $(seq 10); do
    status | jq -e "$(vm_in running)" >/dev/null || fail "the grid VM left running because of its own load"
    sleep 0.5
done
show
echo "  libvirt: $(virsh -c qemu:///system domstate "$VM")"

say "3. A customer load step: stress-ng --cpu $NCPU (outside the grid partition)"
T0=$(date +%s%N)
stress-ng --cpu "$NCPU" --timeout 600s --quiet &
LOAD_PID=$!
wait_until 10 "grid VM paused" "$(vm_in suspended)"
T1=$(date +%s%N)
status | jq -e "$(last_reason suspended cpu_pressure)" >/dev/null || fail "suspend reason is not cpu_pressure"
STATE=$(virsh -c qemu:///system domstate "$VM")
[ "$STATE" = paused ] || fail "libvirt says '$STATE', not paused"
echo "  paused $(( (T1 - T0) / 1000000 )) ms after the load began (reason cpu_pressure); libvirt: $STATE"

say "4. The customer load ends: the VM resumes after resume_after (3 s) of calm"
kill "$LOAD_PID"; wait "$LOAD_PID" 2>/dev/null || true; LOAD_PID=
wait_until 30 "grid VM resumed" "$(vm_in running)"
status | jq -e "$(last_reason running idle)" >/dev/null || fail "resume reason is not idle"
echo "  libvirt: $(virsh -c qemu:///system domstate "$VM")"

say "5. The load returns and stays: reclaimed after reclaim_after (12 s) suspended"
stress-ng --cpu "$NCPU" --timeout 600s --quiet &
LOAD_PID=$!
wait_until 10 "grid VM paused again" "$(vm_in suspended)"
wait_until 40 "grid VM reclaimed" "$(last_reason reclaimed suspended_too_long)"
# The destroy runs on the agent's runtime worker; give libvirt a moment.
for _ in $(seq 60); do
    virsh -c qemu:///system list --all --name | grep -qx "$VM" || break
    sleep 0.5
done
virsh -c qemu:///system list --all --name | grep -qx "$VM" && fail "domain $VM still exists 30 s after reclaim"
echo "  domain $VM is gone from libvirt"
kill "$LOAD_PID"; wait "$LOAD_PID" 2>/dev/null || true; LOAD_PID=

say "Transitions (what the agent decided and why)"
status | jq -r '.transitions[] | "  \(.vm): \(.from) → \(.to)  (\(.reason), load \(.load * 100 | floor)%)"'
say "Metrics (excerpt)"
curl -sf "http://127.0.0.1:$PORT/metrics" | grep -E '^sparegrid_(transitions_total|load_factor|grid_vms)' | sed 's/^/  /'

say "6. SIGTERM: drain and exit"
kill -TERM "$AGENT_PID"
if wait "$AGENT_PID"; then echo "  agent exited 0"; else fail "agent exited with $?"; fi
AGENT_PID=
echo
echo "demo: OK"
