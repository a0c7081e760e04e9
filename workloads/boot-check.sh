#!/usr/bin/env bash
# Boots the guest image once under libvirt and checks that it works:
#   - "sparegrid-guest: ready" appears on the serial console within a deadline
#   - on the virtio-serial channel org.sparegrid.guest.0 (a unix socket on the
#     host):
#     - image with the worker (manifest.json has a guest_version): the worker
#       answers an Attach with a Hello (sparegrid-guest-probe), and runs one
#       subtask using the image's interpreters (sh, awk) with the right output;
#     - image without it: the placeholder's heartbeat lines arrive.
# Prints the time from `virsh create` to "ready" (and to the Hello). Needs a
# running libvirtd (`make libvirtd`) and a built image (`make image`).
#
# Usage: workloads/boot-check.sh [IMAGE_DIR]
# Environment: LIBVIRT_URI (qemu:///system), DOMAIN_TYPE (qemu: TCG, works
# everywhere; kvm where nested guests work), BOOT_DEADLINE seconds (30),
# BURN=1 to boot with sparegrid.burn=1 and report the guest's CPU time,
# BOOT_CMDLINE to replace the kernel command line, KEEP=1 to keep the temp dir,
# PROBE (the sparegrid-guest-probe binary; default: make guest-bin's output),
# MEMORY_MIB (256; a big initramfs such as one with python3 needs more),
# CHECK_CMD (a shell command the guest runs after the built-in check; must
# exit 0, e.g. "python3 -c 'print(6*7)'"), BENCH=1 to print the no-op round
# trip over the channel (BENCH_RUNS, 200) and the output throughput of
# BENCH_MIB (100) MiB (give the guest MEMORY_MIB=512: the worker keeps it).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
IMAGE_DIR=$(realpath "${1:-$HERE/out/default}")
URI=${LIBVIRT_URI:-qemu:///system}
DOMAIN_TYPE=${DOMAIN_TYPE:-qemu}
DEADLINE=${BOOT_DEADLINE:-30}
BURN=${BURN:-0}
NAME=sparegrid-bootcheck-$$

log() { printf 'boot-check: %s\n' "$*" >&2; }
die() { printf 'boot-check: FAIL: %s\n' "$*" >&2; exit 1; }

for f in vmlinuz initrd.img; do
    [[ -f $IMAGE_DIR/$f ]] || die "missing $IMAGE_DIR/$f (run make image)"
done
MEMORY_MIB=${MEMORY_MIB:-256}
# The worker is in the image when its manifest names its version.
GUEST_VERSION=""
if [[ -f $IMAGE_DIR/manifest.json ]]; then
    GUEST_VERSION=$(sed -n 's/^ *"guest_version": *"\([^"]*\)".*/\1/p' "$IMAGE_DIR/manifest.json")
fi
if [[ -n $GUEST_VERSION ]]; then
    PROBE=${PROBE:-$HERE/../target/guest/x86_64-unknown-linux-gnu/release/sparegrid-guest-probe}
    [[ -x $PROBE ]] || die "no probe at $PROBE (run make guest-bin, or set PROBE)"
else
    command -v socat >/dev/null || command -v python3 >/dev/null ||
        die "socat (or python3) is needed to read the channel socket"
fi

# libvirt creates the console file and the channel socket itself and hands
# qemu their descriptors, so a root-owned 0755 directory is enough.
DIR=$(mktemp -d /tmp/sparegrid-bootcheck.XXXXXX)
chmod 0755 "$DIR"
CONSOLE=$DIR/console.log
SOCK=$DIR/guest.sock
cleanup() {
    virsh -q -c "$URI" destroy "$NAME" >/dev/null 2>&1 || true
    if [[ -n ${KEEP:-} ]]; then log "kept $DIR"; else rm -rf "$DIR"; fi
}
trap cleanup EXIT

# qemu opens the kernel and initrd as libvirt-qemu: every parent directory must
# be searchable by it. A clone under /root is not; say so (a real-VM test
# pointed at such a directory fails the same way) and boot a copy instead.
if id libvirt-qemu >/dev/null 2>&1 && command -v runuser >/dev/null &&
    ! runuser -u libvirt-qemu -- test -r "$IMAGE_DIR/initrd.img"; then
    log "WARNING: user libvirt-qemu cannot read $IMAGE_DIR (a parent directory is not searchable); booting a copy"
    cp "$IMAGE_DIR/vmlinuz" "$IMAGE_DIR/initrd.img" "$DIR/"
    chmod 0644 "$DIR/vmlinuz" "$DIR/initrd.img"
    IMAGE_DIR=$DIR
fi

CMDLINE="${BOOT_CMDLINE:-console=ttyS0 quiet panic=-1}"
[[ $BURN == 1 ]] && CMDLINE+=" sparegrid.burn=1"

cat >"$DIR/domain.xml" <<EOF
<domain type='$DOMAIN_TYPE'>
  <name>$NAME</name>
  <memory unit='MiB'>$MEMORY_MIB</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$IMAGE_DIR/vmlinuz</kernel>
    <initrd>$IMAGE_DIR/initrd.img</initrd>
    <cmdline>$CMDLINE</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'>
      <source path='$CONSOLE'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <source mode='bind' path='$SOCK'/>
      <target type='virtio' name='org.sparegrid.guest.0'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>
EOF

start=$(date +%s.%N)
virsh -q -c "$URI" create "$DIR/domain.xml" >/dev/null || die "virsh create failed"
log "started $NAME ($DOMAIN_TYPE)"

ready=""
while :; do
    if grep -q 'sparegrid-guest: ready' "$CONSOLE" 2>/dev/null; then
        ready=$(date +%s.%N)
        break
    fi
    now=$(date +%s.%N)
    if awk -v a="$start" -v b="$now" -v d="$DEADLINE" 'BEGIN{exit !(b-a>d)}'; then
        sed 's/^/  console: /' "$CONSOLE" >&2 2>/dev/null || true
        die "no 'sparegrid-guest: ready' within ${DEADLINE}s"
    fi
    sleep 0.1
done
boot=$(awk -v a="$start" -v b="$ready" 'BEGIN{printf "%.2f", b-a}')
log "ready after ${boot}s"

if [[ -n $GUEST_VERSION ]]; then
    # The worker: Attach -> Hello, then one subtask through sh and awk.
    log "image carries sparegrid-guest $GUEST_VERSION: probing the channel"
    out=$("$PROBE" "$SOCK" --timeout "$DEADLINE" -- \
        sh -c 'echo "uname=$(uname -r)"; seq 1 6 | awk "{s += \$1} END {print \"sum=\" s}"; echo "cwd=$(pwd)"') ||
        { printf '%s\n' "$out" | sed 's/^/  probe: /' >&2; sed 's/^/  console: /' "$CONSOLE" >&2; die "the worker did not answer or the subtask failed"; }
    hello_at=$(date +%s.%N)
    printf '%s\n' "$out" | sed 's/^/  probe: /' >&2
    hello=$(sed -n 's/^hello //p' <<<"$out")
    grep -q "\"worker_version\":\"$GUEST_VERSION\"" <<<"$hello" ||
        die "Hello does not carry worker_version $GUEST_VERSION: $hello"
    grep -qx 'sum=21' <<<"$out" || die "awk in the guest did not print sum=21"
    grep -qx 'cwd=/tmp' <<<"$out" || die "the subtask did not run in /tmp"
    grep -q '"exit_code":0' <<<"$(sed -n 's/^result //p' <<<"$out")" || die "the subtask did not exit 0"
    if [[ -n ${CHECK_CMD:-} ]]; then
        extra=$("$PROBE" "$SOCK" --timeout "$DEADLINE" -- sh -c "$CHECK_CMD") ||
            { printf '%s\n' "$extra" | sed 's/^/  check: /' >&2; die "CHECK_CMD failed in the guest: $CHECK_CMD"; }
        printf '%s\n' "$extra" | grep -v '^hello ' | sed 's/^/  check: /' >&2
    fi
    if [[ ${BENCH:-0} == 1 ]]; then
        # Figures, not checks: no-op round trips and output throughput.
        "$PROBE" "$SOCK" --timeout 300 --quiet --repeat "${BENCH_RUNS:-200}" -- true 2>&1 >/dev/null |
            sed 's/^probe:/  bench no-op:/' >&2
        mib=${BENCH_MIB:-100}
        # The same output only counted, not kept or sent: the guest side alone.
        "$PROBE" "$SOCK" --timeout 300 --quiet --cap 0 -- dd if=/dev/zero bs=1048576 count="$mib" 2>&1 >/dev/null |
            sed 's/^probe:/  bench output, not sent (cap 0):/' >&2
        "$PROBE" "$SOCK" --timeout 300 --quiet --cap $((mib << 20)) -- dd if=/dev/zero bs=1048576 count="$mib" 2>&1 >/dev/null |
            sed 's/^probe:/  bench output:/' >&2
    fi
    hello_s=$(awk -v a="$start" -v b="$hello_at" 'BEGIN{printf "%.2f", b-a}')
    sed 's/^/  console: /' "$CONSOLE" >&2
    echo "boot-check: OK ready_after_s=$boot worker=$GUEST_VERSION subtask_done_after_s=$hello_s"
    exit 0
fi

# No worker: read the channel for a few seconds, expect two heartbeat lines.
if command -v socat >/dev/null; then
    beats=$(timeout 4.5 socat -u UNIX-CONNECT:"$SOCK" - || true)
else
    beats=$(python3 - "$SOCK" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(0.5)
buf, end = b"", time.time() + 4.5
while time.time() < end:
    try:
        chunk = s.recv(4096)
    except socket.timeout:
        continue
    if not chunk:
        break
    buf += chunk
sys.stdout.write(buf.decode(errors="replace"))
PY
    ) || die "cannot read $SOCK"
fi
n=$(grep -c 'sparegrid-guest heartbeat' <<<"$beats" || true)
printf '%s\n' "$beats" | head -n 3 | sed 's/^/  channel: /' >&2
[[ $n -ge 2 ]] || die "expected >= 2 heartbeats on the channel in 4.5s, got $n"
log "$n heartbeats on the channel"

if [[ $BURN == 1 ]]; then
    t0=$(virsh -c "$URI" domstats --cpu-total "$NAME" | awk -F= '/cpu.time=/{print $2}')
    sleep 2
    t1=$(virsh -c "$URI" domstats --cpu-total "$NAME" | awk -F= '/cpu.time=/{print $2}')
    log "guest CPU over 2s wall: $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", (b-a)/1e9}')s"
fi
sed 's/^/  console: /' "$CONSOLE" >&2
echo "boot-check: OK ready_after_s=$boot heartbeats=$n"
