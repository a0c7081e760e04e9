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
#                            modules.dep (default: "virtio_pci virtio_console virtio_rng virtio_net";
#                            virtio_net is the overlay NIC of network = "overlay" jobs)
#   SPAREGRID_GUEST_BIN      a static guest worker to install as /bin/sparegrid-guest
#                            (its --version goes into the manifest as guest_version)
#   SPAREGRID_EXTRA_BINARIES host programs to add to /bin with the shared libraries
#                            ldd names (e.g. "python3 perl"); names are looked up in
#                            /usr/local/bin:/usr/bin:/bin, or give absolute paths
#                            (EXTRA_BINARIES is read when this is unset)
#   SPAREGRID_EXTRA_FILES    host files or directories copied to the same path in
#                            the initrd, plus the shared libraries of any ELF file
#                            among them (e.g. "/usr/lib/python3.11"; EXTRA_FILES too)
#   SPAREGRID_EXTRA_EXCLUDE  names (find -name patterns) left out of the copied
#                            trees, e.g. "config-3.11-* __pycache__ idlelib"
#   SPAREGRID_KERNEL_FLAVOUR kernel flavour suffix   (default: cloud-amd64)
#   SOURCE_DATE_EPOCH        mtime for every file in the initrd (default: 0)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${SPAREGRID_IMAGE_OUT:-$HERE/out/default}
MODULES=${SPAREGRID_GUEST_MODULES:-virtio_pci virtio_console virtio_rng virtio_net}
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
GUEST_VERSION=""
if [[ -n ${SPAREGRID_GUEST_BIN:-} ]]; then
    [[ -x $SPAREGRID_GUEST_BIN ]] || die "SPAREGRID_GUEST_BIN=$SPAREGRID_GUEST_BIN is not executable"
    # The initramfs has no libc: the worker must be static (ldd of a
    # static-pie says "statically linked" and succeeds; only a dynamic one
    # lists libraries with "=>").
    if ldd "$SPAREGRID_GUEST_BIN" 2>/dev/null | grep -q '=>'; then
        die "SPAREGRID_GUEST_BIN=$SPAREGRID_GUEST_BIN is dynamically linked (build it with crt-static: make guest-bin)"
    fi
    GUEST_VERSION=$("$SPAREGRID_GUEST_BIN" --version | awk '$1 == "sparegrid-guest" {print $2}')
    [[ -n $GUEST_VERSION ]] || die "$SPAREGRID_GUEST_BIN --version did not print 'sparegrid-guest <version>'"
    cp "$SPAREGRID_GUEST_BIN" "$ROOT/bin/sparegrid-guest"
    log "guest worker $GUEST_VERSION: $SPAREGRID_GUEST_BIN"
fi

# --- extra binaries and files (an operator's own workload) ------------------

# copy_libs FILE: copies the shared libraries FILE needs (as ldd resolves them
# on this host, the dynamic loader included) to the same paths in the initrd.
copy_libs() {
    local lib
    ldd "$1" >/dev/null 2>&1 || return 0 # static, or not ELF
    for lib in $(ldd "$1" | awk '/=> \// {print $3} /^\t\// {print $1}'); do
        [[ -e $ROOT$lib ]] && continue
        mkdir -p "$ROOT$(dirname "$lib")"
        cp -L "$lib" "$ROOT$lib"
    done
}
EXTRA_BINARIES=${SPAREGRID_EXTRA_BINARIES:-${EXTRA_BINARIES:-}}
EXTRA_FILES=${SPAREGRID_EXTRA_FILES:-${EXTRA_FILES:-}}
# An array, so patterns like config-3.11-* are not globbed here.
read -ra EXCLUDE <<<"${SPAREGRID_EXTRA_EXCLUDE:-${EXTRA_EXCLUDE:-}}"
for b in $EXTRA_BINARIES; do
    if [[ $b == /* ]]; then src=$b; else
        # Not the caller's PATH: pyenv or venv shims are scripts.
        src=$(PATH=/usr/local/bin:/usr/bin:/bin command -v "$b" || true)
    fi
    [[ -n $src && -x $src ]] || die "extra binary $b: not found in /usr/local/bin:/usr/bin:/bin"
    real=$(readlink -f "$src")
    # Replaces a busybox applet link of the same name (cp would follow it).
    rm -f "$ROOT/bin/$(basename "$b")"
    cp "$real" "$ROOT/bin/$(basename "$b")"
    copy_libs "$real"
    log "extra binary $(basename "$b") from $real"
done
for f in $EXTRA_FILES; do
    [[ $f == /* && -e $f ]] || die "extra file $f: not an existing absolute path"
    mkdir -p "$ROOT$(dirname "$f")"
    cp -a "$f" "$ROOT$(dirname "$f")/"
    for pat in "${EXCLUDE[@]}"; do
        find "$ROOT$f" -mindepth 1 -name "$pat" -prune -exec rm -rf {} +
    done
    while IFS= read -r -d '' x; do copy_libs "$x"; done < <(find "$f" -type f -name '*.so*' -print0)
    log "extra files $f ($(du -sh "$ROOT$f" | cut -f1) of $(du -sh "$f" | cut -f1))"
done
if [[ -n $EXTRA_BINARIES$EXTRA_FILES ]]; then
    # The dynamic loader's usual home on x86_64.
    if [[ -e $ROOT/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 && ! -e $ROOT/lib64/ld-linux-x86-64.so.2 ]]; then
        mkdir -p "$ROOT/lib64"
        ln -s ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$ROOT/lib64/ld-linux-x86-64.so.2"
    fi
fi

# Interpreters the image carries (the manifest lists them; the agent checks
# a workload's interpreters against this list).
INTERPRETERS=()
for i in sh bash awk python3 perl ruby node lua tclsh; do
    [[ -e $ROOT/bin/$i ]] && INTERPRETERS+=("$i")
done
log "interpreters: ${INTERPRETERS[*]}"
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
interp_json=""
for n in "${INTERPRETERS[@]}"; do interp_json+="${interp_json:+, }\"$n\""; done
guest_version_json=null
[[ -n $GUEST_VERSION ]] && guest_version_json="\"$GUEST_VERSION\""
cat >"$WORK/manifest.json" <<EOF
{
  "version": $FORMAT_VERSION,
  "name": "$(basename "$OUT")",
  "kernel_version": "$KVER",
  "modules": [$mods_json],
  "guest_port": "$PORT_NAME",
  "guest_version": $guest_version_json,
  "interpreters": [$interp_json],
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
