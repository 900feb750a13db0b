# Debian packages of the image (sourced by build.sh). The Python dependencies come from
# requirements/lock.txt in customize.sh; build-only packages are purged there.

# runtime: init, clock, TPM, audio, Python
BASE_PKGS="systemd systemd-sysv systemd-timesyncd udev dbus ca-certificates \
iproute2 netbase systemd-resolved \
python3 python3-venv \
libportaudio2 libsndfile1 libasound2 alsa-utils \
tpm-udev libtss2-esys-3.0.2-0 libtss2-tctildr0 libtss2-tcti-device0 libtss2-mu0 libtss2-rc0 libtss2-fapi1 \
tpm2-tools"

# compile tpm2-pytss (sdist only) in the image, purged afterwards
BUILD_PKGS="build-essential pkg-config python3-dev libtss2-dev libffi-dev"

packages_for() {
  local arch=$1 extra=""
  case "$arch" in
    # Pi 5 kernel and firmware come from the Raspberry Pi OS archive, added by
    # customize.sh (Debian's own arm64 kernel does not drive the Pi 5 yet)
    arm64) extra="" ;;
    # the amd64 build is for inspecting and booting the recipe on an x86 host: Debian's
    # kernel and its initramfs (qemu boots them directly, `make image-boot`; no bootloader)
    amd64) extra="linux-image-amd64 initramfs-tools" ;;
  esac
  echo "$BASE_PKGS $BUILD_PKGS $extra" | tr -s ' ' ','
}
