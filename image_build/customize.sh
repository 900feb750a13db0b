#!/usr/bin/env bash
# mmdebstrap --customize-hook for image_build/build.sh: runs on the build host with the
# new rootfs at $1 (commands inside it through chroot; qemu-user for a foreign ARCH).
#   customize.sh ROOTFS REPO ARCH ROOT_PARTUUID
set -euo pipefail
R=$1 REPO=$2 ARCH=$3 ROOT_PARTUUID=$4
HERE=$(cd "$(dirname "$0")" && pwd)
in_root() { chroot "$R" "$@"; }
. "$HERE/packages.sh"

echo "-- Raspberry Pi 5 kernel and boot files ($ARCH)"
if [ "$ARCH" = arm64 ]; then
  key="$HERE/keys/raspberrypi-archive-keyring.gpg"
  [ -f "$key" ] || { echo "need $key (the Raspberry Pi OS archive key; docs/adr/0019-image-build.md)" >&2; exit 2; }
  install -m 0644 "$key" "$R/usr/share/keyrings/raspberrypi-archive-keyring.gpg"
  echo "deb [signed-by=/usr/share/keyrings/raspberrypi-archive-keyring.gpg] http://archive.raspberrypi.com/debian bookworm main" \
    > "$R/etc/apt/sources.list.d/raspi.list"
  in_root apt-get update -q
  in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    linux-image-rpi-2712 raspi-firmware
fi

echo "-- the daemon: a venv with the edge dependencies pinned by requirements/lock.txt (no torch)"
SRC="$R/opt/sovereign-edge/src"
mkdir -p "$SRC"
cp -a "$REPO/pyproject.toml" "$SRC/"
for pkg in fleet_protocol fleet_model edge_daemon; do
  (cd "$REPO" && find "$pkg" -name '__pycache__' -prune -o -type f -print0 \
    | xargs -0 cp --parents -p -t "$SRC")
done
cp "$REPO/requirements/lock.txt" "$R/tmp/lock.txt"
python3 - "$REPO" > "$R/tmp/edge-req.txt" <<'PY'
import pathlib, re, sys, tomllib
project = tomllib.loads((pathlib.Path(sys.argv[1]) / "pyproject.toml").read_text())["project"]
for dep in project["dependencies"] + project["optional-dependencies"]["edge"]:
    name = re.split(r"[<>=!~ \[;]", dep, maxsplit=1)[0]
    if name.lower() != "silero-vad":  # installed with --no-deps below: it declares torch
        print(name)
PY
silero=$(grep -i '^silero-vad==' "$REPO/requirements/lock.txt")
in_root python3 -m venv /opt/sovereign-edge/venv
# the image's resolv.conf points at systemd-resolved, which does not run in the chroot:
# borrow the host's for the downloads, put the link back afterwards
resolv=$(readlink "$R/etc/resolv.conf" || true)
cp --remove-destination /etc/resolv.conf "$R/etc/resolv.conf"
# and the host's CA bundle (a build network may inspect TLS): the image's own trust
# store is left as Debian ships it
cp /etc/ssl/certs/ca-certificates.crt "$R/tmp/build-host-ca.crt"
PIP="env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null PIP_CERT=/tmp/build-host-ca.crt \
  REQUESTS_CA_BUNDLE=/tmp/build-host-ca.crt SSL_CERT_FILE=/tmp/build-host-ca.crt \
  /opt/sovereign-edge/venv/bin/pip --disable-pip-version-check --no-cache-dir -q"
in_root $PIP install -c /tmp/lock.txt -r /tmp/edge-req.txt
in_root $PIP install --no-deps "$silero"
in_root $PIP install --no-deps /opt/sovereign-edge/src
if in_root /opt/sovereign-edge/venv/bin/python -c "import torch" 2>/dev/null; then
  echo "torch ended up in the device venv" >&2; exit 1
fi
in_root /opt/sovereign-edge/venv/bin/edge-daemon --help >/dev/null
rm -rf "$SRC" "$R/tmp/lock.txt" "$R/tmp/edge-req.txt" "$R/tmp/build-host-ca.crt"
if [ -n "$resolv" ]; then ln -sf "$resolv" "$R/etc/resolv.conf"; fi

echo "-- build-only packages out"
in_root env DEBIAN_FRONTEND=noninteractive apt-get purge -y -q --auto-remove $BUILD_PKGS
in_root apt-get clean
rm -rf "$R"/var/lib/apt/lists/* "$R"/root/.cache

echo "-- users, files, units"
in_root useradd --system --user-group --home-dir /var/lib/edge-daemon --no-create-home \
  --shell /usr/sbin/nologin --groups audio,tss edge-daemon
cp -a "$HERE/rootfs/." "$R/"
chmod 0755 "$R/opt/sovereign-edge/lib/firstboot.sh"
install -d "$R/usr/share/doc/sovereign-edge"
install -m 0644 "$REPO/docs/operator-guide.md" "$R/usr/share/doc/sovereign-edge/"
install -m 0644 "$REPO/examples/device.json" "$R/usr/share/doc/sovereign-edge/device.example.json"
for unit in edge-daemon.service edge-firstboot.service; do
  install -m 0644 "$REPO/systemd/$unit" "$R/etc/systemd/system/$unit"
done
systemctl --root="$R" enable edge-firstboot.service edge-daemon.service \
  systemd-timesyncd.service systemd-time-wait-sync.service \
  systemd-networkd.service systemd-resolved.service
echo sovereign-edge > "$R/etc/hostname"

echo "-- data partition skeleton (state, config, clock file), mounted from fstab"
D="$R/srv/sovereign-edge"
install -d -m 0755 "$D"
install -d -m 0700 -o "$(in_root id -u edge-daemon)" -g "$(in_root id -g edge-daemon)" "$D/state"
install -d -m 0750 -o 0 -g "$(in_root id -g edge-daemon)" "$D/etc"
install -d -m 0700 "$D/etc/claim"
tsu=$(in_root id -u systemd-timesync 2>/dev/null || echo 0)
install -d -m 0755 -o "$tsu" -g "$tsu" "$D/timesync"
install -d "$R/var/lib/edge-daemon" "$R/etc/edge-daemon" "$R/var/lib/systemd/timesync"
# systemd-logind's StateDirectory: created at build time, since the root is read-only at
# run time (without it logind fails with 238/STATE_DIRECTORY on every boot)
install -d -m 0755 "$R/var/lib/systemd/linger"

echo "-- firmware config"
install -m 0644 "$REPO/firmware_config/config.txt" "$R/boot/firmware/config.txt"
sed "s/@ROOT_PARTUUID@/$ROOT_PARTUUID/" "$REPO/firmware_config/cmdline.txt" > "$R/boot/firmware/cmdline.txt"
install -d "$R/boot/firmware/sovereign-edge"
cat > "$R/boot/firmware/sovereign-edge/README.txt" <<'TXT'
Put here before the first boot (docs/operator-guide.md, "Flash and provision"):
  device.json        the device configuration (examples/device.json)
  fleet-ca.pem, cloud-unwrap.pem, ota-signing.pem
  models/            base.fp32.onnx, base.int8.onnx (from cloud-sidecar pretrain)
  claim/claim.crt, claim/claim.key, claim/claim.token   (erased after first boot)
TXT
