#!/usr/bin/env bash
# Build a flashable sovereign-edge SD-card image: `make image ARCH=arm64` (or amd64).
#
#   image_build/build.sh [ARCH] [OUT_DIR]      ARCH: arm64 (default) | amd64
#
# Steps: lint firmware_config/ → mmdebstrap a Debian bookworm rootfs (customize hook:
# image_build/customize.sh installs the daemon in a venv without torch, the units, the
# firmware config, first-boot provisioning, clock and watchdog settings) → assemble an
# MBR image: p1 FAT32 /boot/firmware, p2 ext4 root (mounted read-only), p3 ext4
# data (state, config, clock file). Writes OUT_DIR/sovereign-edge-<ARCH>.img and its
# .sha256. Reproducible inputs: the Debian snapshot (SNAPSHOT), requirements/lock.txt
# pins, SOURCE_DATE_EPOCH from the last commit. Needs root (mmdebstrap --mode=root),
# mmdebstrap, dosfstools, mtools, fdisk, e2fsprogs; for ARCH=arm64 on an x86 host also
# qemu-user-static + binfmt-support (docs/adr/0019-image-build.md).
set -euo pipefail

ARCH=${1:-${ARCH:-arm64}}
OUT=${2:-${OUT:-build}}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
SUITE=bookworm
MIRROR=${MIRROR:-http://deb.debian.org/debian}
BOOT_MB=${BOOT_MB:-256}
DATA_MB=${DATA_MB:-256}
DISK_ID=${DISK_ID:-0x5e0e0001}  # fixed: PARTUUIDs are <disk id>-0N, known at build time
ROOT_PARTUUID="${DISK_ID#0x}-02"

case "$ARCH" in
  arm64|amd64) ;;
  *) echo "ARCH must be arm64 or amd64, not $ARCH" >&2; exit 2 ;;
esac
for tool in mmdebstrap mkfs.vfat mcopy sfdisk mke2fs; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install mmdebstrap dosfstools mtools fdisk e2fsprogs)" >&2; exit 2; }
done
if [ "$ARCH" = arm64 ] && [ "$(dpkg --print-architecture)" != arm64 ] \
   && [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  echo "ARCH=arm64 on $(dpkg --print-architecture) needs qemu-user binfmt: apt-get install qemu-user-static binfmt-support" >&2
  exit 2
fi

python3 "$REPO/firmware_config/lint.py"
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "$OUT/.image-XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# shellcheck source=image_build/packages.sh
. "$HERE/packages.sh"
PKGS=$(packages_for "$ARCH")

echo "== rootfs ($ARCH, $SUITE) =="
mmdebstrap --mode=root --arch="$ARCH" --variant=minbase \
  --include="$PKGS" \
  --setup-hook='mkdir -p "$1/boot/firmware"' \
  --customize-hook="\"$HERE/customize.sh\" \"\$1\" \"$REPO\" \"$ARCH\" \"$ROOT_PARTUUID\"" \
  "$SUITE" "$WORK/rootfs" "$MIRROR"

echo "== partitions =="
mv "$WORK/rootfs/boot/firmware" "$WORK/bootfs"
mkdir -p "$WORK/rootfs/boot/firmware"
mv "$WORK/rootfs/srv/sovereign-edge" "$WORK/datafs"
mkdir -p "$WORK/rootfs/srv/sovereign-edge"
root_mb=$(( $(du -sm "$WORK/rootfs" | cut -f1) * 12 / 10 + 128 ))
mkfs.vfat -C -F 32 -n BOOTFS -i "${DISK_ID#0x}" "$WORK/boot.img" $(( BOOT_MB * 1024 )) >/dev/null
(cd "$WORK/bootfs" && find . -mindepth 1 -maxdepth 1 -print0 | xargs -0 -r -I{} mcopy -s -p -m -i "$WORK/boot.img" {} ::/)
E2OPTS=(-q -t ext4 -E "root_owner=0:0" -U clear)
mke2fs "${E2OPTS[@]}" -L rootfs -d "$WORK/rootfs" "$WORK/root.img" "${root_mb}M"
mke2fs "${E2OPTS[@]}" -L se-data -d "$WORK/datafs" "$WORK/data.img" "${DATA_MB}M"

echo "== image =="
IMG="$OUT/sovereign-edge-$ARCH.img"
start=8192  # 4 MiB alignment
boot_s=$(( BOOT_MB * 2048 )); root_s=$(( root_mb * 2048 )); data_s=$(( DATA_MB * 2048 ))
total=$(( start + boot_s + root_s + data_s + 2048 ))
rm -f "$IMG"
truncate -s $(( total * 512 )) "$IMG"
sfdisk -q "$IMG" <<SFDISK
label: dos
label-id: $DISK_ID
unit: sectors
start=$start, size=$boot_s, type=c, bootable
start=$(( start + boot_s )), size=$root_s, type=83
start=$(( start + boot_s + root_s )), size=$data_s, type=83
SFDISK
dd if="$WORK/boot.img" of="$IMG" bs=512 seek=$start conv=notrunc,sparse status=none
dd if="$WORK/root.img" of="$IMG" bs=512 seek=$(( start + boot_s )) conv=notrunc,sparse status=none
dd if="$WORK/data.img" of="$IMG" bs=512 seek=$(( start + boot_s + root_s )) conv=notrunc,sparse status=none
(cd "$OUT" && sha256sum "$(basename "$IMG")" > "$(basename "$IMG").sha256")
echo "wrote $IMG ($(( total / 2048 )) MiB; root PARTUUID=$ROOT_PARTUUID)"
