#!/usr/bin/env bash
# Builds the default sparegrid guest image into workloads/out/default/:
#
#   vmlinuz        a copy of Debian's cloud kernel (linux-image-cloud-amd64)
#   initrd.img     gzip'd cpio (newc): busybox-static + applet links, the
#                  virtio modules the guest needs, and workloads/guest/init
#   manifest.json  format version, kernel version, module list, sha256 digests
#
# The build is reproducible (fixed mtimes, sorted cpio, gzip -n), so running it
# twice gives byte-identical files and the same digests; files that did not
# change are left alone. See workloads/README.md.
#
# Environment (all optional):
#   SPAREGRID_IMAGE_OUT      output directory        (default: workloads/out/default)
#   SPAREGRID_GUEST_MODULES  modules to load, deps are added and ordered from
#                            modules.dep (default: "virtio_pci virtio_console virtio_rng")
#   SPAREGRID_GUEST_BIN      a static guest worker to install as /bin/sparegrid-guest
#   SPAREGRID_KERNEL_FLAVOUR kernel flavour suffix   (default: cloud-amd64)
#   SOURCE_DATE_EPOCH        mtime for every file in the initrd (default: 0)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${SPAREGRID_IMAGE_OUT:-$HERE/out/default}
MODULES=${SPAREGRID_GUEST_MODULES:-virtio_pci virtio_console virtio_rng}
FLAVOUR=${SPAREGRID_KERNEL_FLAVOUR:-cloud-amd64}
EPOCH=${SOURCE_DATE_EPOCH:-0}
# Bump when the image layout or the /init contract (cmdline keys, port name,
# console lines) changes.
FORMAT_VERSION=1
PORT_NAME=org.sparegrid.guest.0

log() { printf 'build-image: %s\n' "$*" >&2; }
die() { printf 'build-image: error: %s\n' "$*" >&2; exit 1; }

for tool in cpio gzip sha256sum find sort; do
    command -v "$tool" >/dev/null || die "missing tool: $tool (run 'make deps')"
done

# --- kernel ---------------------------------------------------------------

newest_kernel() {
    # Newest installed kernel of our flavour, by version order; empty if none.
    local k
    k=$(ls -1 /boot/vmlinuz-*-"$FLAVOUR" 2>/dev/null | sort -V | tail -n1 || true)
    [[ -n $k ]] && echo "$k"
    return 0
}

KERNEL=$(newest_kernel)
if [[ -z $KERNEL ]]; then
    log "no /boot/vmlinuz-*-$FLAVOUR: installing linux-image-$FLAVOUR"
    [[ $(id -u) -eq 0 ]] || die "need root to apt-get install linux-image-$FLAVOUR"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "linux-image-$FLAVOUR" >&2 ||
        { apt-get update >&2 && apt-get install -y --no-install-recommends "linux-image-$FLAVOUR" >&2; }
    KERNEL=$(newest_kernel)
    [[ -n $KERNEL ]] || die "linux-image-$FLAVOUR installed but no /boot/vmlinuz-*-$FLAVOUR"
fi
KVER=${KERNEL#/boot/vmlinuz-}
MODDIR=/lib/modules/$KVER
[[ -r $KERNEL ]] || die "cannot read $KERNEL"
[[ -f $MODDIR/modules.dep ]] || die "missing $MODDIR/modules.dep"
log "kernel $KVER ($KERNEL)"

BUSYBOX=""
for b in /bin/busybox /usr/bin/busybox; do
    if [[ -x $b ]] && ! ldd "$b" >/dev/null 2>&1; then BUSYBOX=$b; break; fi
done
[[ -n $BUSYBOX ]] || die "no static busybox (apt-get install busybox-static)"

# --- module closure in load order ------------------------------------------

# name -> path (relative to $MODDIR) from modules.dep; '-' and '_' are the same.
declare -A MOD_PATH MOD_DEPS
while IFS= read -r line; do
    path=${line%%:*}
    deps=${line#*:}
    base=${path##*/}
    name=${base%%.ko*}
    name=${name//-/_}
    MOD_PATH[$name]=$path
    MOD_DEPS[$name]=$deps
done <"$MODDIR/modules.dep"

is_builtin() {
    local n=$1
    [[ -f $MODDIR/modules.builtin ]] || return 1
    sed -e 's#.*/##' -e 's#\.ko.*##' -e 's#-#_#g' "$MODDIR/modules.builtin" | grep -qx "$n"
}

declare -A SEEN
ORDER=()
visit() {
    local n=${1//-/_} d dn
    [[ -n ${SEEN[$n]:-} ]] && return 0
    SEEN[$n]=1
    if [[ -z ${MOD_PATH[$n]:-} ]]; then
        if is_builtin "$n"; then
            log "module $n is built into $KVER"
            return 0
        fi
        die "module $n not found in $MODDIR/modules.dep"
    fi
    for d in ${MOD_DEPS[$n]}; do
        dn=${d##*/}
        dn=${dn%%.ko*}
        visit "$dn"
    done
    ORDER+=("$n")
}
for m in $MODULES; do visit "$m"; done
log "modules in load order: ${ORDER[*]:-(none)}"

# --- initramfs tree ----------------------------------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sparegrid-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,dev,proc,sys,tmp,run,etc,root,var,usr,lib/modules/"$KVER"}
ln -s bin "$ROOT/sbin"
ln -s ../bin "$ROOT/usr/bin"
ln -s ../bin "$ROOT/usr/sbin"
chmod 1777 "$ROOT/tmp"

cp "$BUSYBOX" "$ROOT/bin/busybox"
n_applets=0
for a in $("$BUSYBOX" --list); do
    [[ $a == busybox ]] && continue
    ln -s busybox "$ROOT/bin/$a"
    n_applets=$((n_applets + 1))
done
log "busybox $("$BUSYBOX" | head -n1 | awk '{print $2}') with $n_applets applets"

: >"$ROOT/etc/sparegrid-modules"
for n in "${ORDER[@]}"; do
    src=$MODDIR/${MOD_PATH[$n]}
    dst=$ROOT/lib/modules/$KVER/$n.ko
    # busybox insmod cannot read compressed modules: unpack them here.
    case $src in
    *.ko) cp "$src" "$dst" ;;
    *.ko.xz) xz -dc "$src" >"$dst" ;;
    *.ko.zst) zstd -qdc "$src" >"$dst" ;;
    *.ko.gz) gzip -dc "$src" >"$dst" ;;
    *) die "unknown module format: $src" ;;
    esac
    echo "/lib/modules/$KVER/$n.ko" >>"$ROOT/etc/sparegrid-modules"
done

cp "$HERE/guest/init" "$ROOT/init"
chmod 0755 "$ROOT/init"
if [[ -n ${SPAREGRID_GUEST_BIN:-} ]]; then
    [[ -x $SPAREGRID_GUEST_BIN ]] || die "SPAREGRID_GUEST_BIN=$SPAREGRID_GUEST_BIN is not executable"
    cp "$SPAREGRID_GUEST_BIN" "$ROOT/bin/sparegrid-guest"
    log "guest worker: $SPAREGRID_GUEST_BIN"
fi
cat >"$ROOT/etc/sparegrid-image" <<EOF
format=$FORMAT_VERSION
kernel=$KVER
port=$PORT_NAME
EOF
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\n' >"$ROOT/etc/group"
# /dev/console lets the kernel give /init a stdout before devtmpfs is mounted;
# without root it cannot be created, and /init reopens the console anyway.
mknod -m 600 "$ROOT/dev/console" c 5 1 2>/dev/null || log "not root: no /dev/console node in the initrd (init copes)"

# --- pack ------------------------------------------------------------------

find "$ROOT" -exec touch -h -d "@$EPOCH" {} +
(cd "$ROOT" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    gzip -9 -n >"$WORK/initrd.img"
cp "$KERNEL" "$WORK/vmlinuz"

mkdir -p "$OUT"
for f in vmlinuz initrd.img; do
    if [[ -f $OUT/$f ]] && cmp -s "$WORK/$f" "$OUT/$f"; then
        log "$f unchanged"
    else
        cp "$WORK/$f" "$OUT/.$f.tmp"
        mv -f "$OUT/.$f.tmp" "$OUT/$f"
        log "wrote $OUT/$f ($(stat -c %s "$OUT/$f") bytes)"
    fi
done

# --- manifest ----------------------------------------------------------------

digest() { sha256sum "$1" | awk '{print $1}'; }
mods_json=""
for n in "${ORDER[@]}"; do mods_json+="${mods_json:+, }\"$n\""; done
cat >"$WORK/manifest.json" <<EOF
{
  "version": $FORMAT_VERSION,
  "name": "$(basename "$OUT")",
  "kernel_version": "$KVER",
  "modules": [$mods_json],
  "guest_port": "$PORT_NAME",
  "cmdline": "console=ttyS0 quiet panic=-1",
  "files": {
    "vmlinuz": { "sha256": "$(digest "$OUT/vmlinuz")", "size": $(stat -c %s "$OUT/vmlinuz") },
    "initrd.img": { "sha256": "$(digest "$OUT/initrd.img")", "size": $(stat -c %s "$OUT/initrd.img") }
  }
}
EOF
if [[ -f $OUT/manifest.json ]] && cmp -s "$WORK/manifest.json" "$OUT/manifest.json"; then
    log "manifest.json unchanged"
else
    cp "$WORK/manifest.json" "$OUT/.manifest.json.tmp"
    mv -f "$OUT/.manifest.json.tmp" "$OUT/manifest.json"
    log "wrote $OUT/manifest.json"
fi
log "done: $OUT"
