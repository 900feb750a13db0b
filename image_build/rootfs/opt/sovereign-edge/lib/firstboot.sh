#!/bin/sh
# First boot of a freshly flashed sovereign-edge device (edge-firstboot.service).
# Installs what the operator put on the boot partition, erases the claim from it,
# creates the TPM keys and prints the signing public key. Idempotent; marks itself done.
set -eu
SRC=/boot/firmware/sovereign-edge
ETC=/etc/edge-daemon
STATE=/var/lib/edge-daemon
BIN=/opt/sovereign-edge/venv/bin/edge-daemon

install -d -m 0750 -o root -g edge-daemon "$ETC"
install -d -m 0700 -o root -g root "$ETC/claim"
install -d -m 0700 -o edge-daemon -g edge-daemon "$STATE" "$STATE/models"
if [ -f "$SRC/device.json" ]; then
  install -m 0640 -o root -g edge-daemon "$SRC/device.json" "$ETC/device.json"
fi
for f in fleet-ca.pem cloud-unwrap.pem ota-signing.pem; do
  if [ -f "$SRC/$f" ]; then install -m 0644 "$SRC/$f" "$ETC/$f"; fi
done
for f in "$SRC"/models/*.onnx "$SRC"/models/*.npy "$SRC"/models/*.npz "$SRC"/models/*.json; do
  if [ -f "$f" ]; then install -m 0644 -o edge-daemon -g edge-daemon "$f" "$STATE/models/"; fi
done
if [ -f "$SRC/claim/claim.crt" ] && [ -f "$SRC/claim/claim.key" ]; then
  install -m 0600 "$SRC/claim/claim.crt" "$SRC/claim/claim.key" "$ETC/claim/"
fi
if [ -f "$SRC/claim/claim.token" ]; then
  install -m 0600 -o edge-daemon -g edge-daemon "$SRC/claim/claim.token" "$STATE/claim.token"
fi
# the claim must not stay readable on a FAT partition anyone can pull out of the Pi
for f in "$SRC"/claim/*; do
  if [ -f "$f" ]; then shred -u "$f" 2>/dev/null || rm -f "$f"; fi
done
if [ -f "$ETC/device.json" ]; then
  "$BIN" validate-config --config "$ETC/device.json"
  echo "TPM signing public key (register it: cloud-sidecar fleet register DEVICE --public-key PEM):"
  "$BIN" keys --config "$ETC/device.json"
  chown -R edge-daemon:edge-daemon "$STATE"
  touch "$STATE/.provisioned"
else
  echo "no $SRC/device.json: nothing to provision (see $SRC/README.txt)" >&2
  exit 1
fi
