# One entry point per job. Each target installs what it needs (scripts/bootstrap.sh).
PY := .venv/bin/python
BOOT := scripts/bootstrap.sh

.PHONY: setup demo test soak check lint types unit integration bench clean image image-test image-boot

setup:
	@bash $(BOOT)

demo: setup
	$(PY) -m devstack demo --out demo-out

test: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not soak" tests

# The long fault tests of tests/faults (issue 9, marker soak): the two-worker test with
# the issue's 60 s broker outage, a device offline past its certificate, a wiped device,
# a device clock a day off. The short fault tests stay in `make test`.
soak: setup
	SE_FAULT_OUTAGE_S=60 $(PY) -m pytest -q -p no:cacheprovider -m soak tests/faults

check: setup lint types unit

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

types:
	$(PY) -m mypy

unit: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests/unit

bench: setup
	$(PY) -m benchmarks.run

# A flashable SD-card image (not part of `test`: minutes and ~1 GB; needs root,
# mmdebstrap, dosfstools, mtools, fdisk, e2fsprogs; qemu-user binfmt for arm64 on x86).
ARCH ?= arm64
image:
	bash image_build/build.sh $(ARCH) build

# Inspect a built image: partitions, files, enabled units, systemd-analyze verify --root.
image-test: setup
	SOVEREIGN_EDGE_IMAGE=build/sovereign-edge-$(ARCH).img $(PY) -m pytest -q -p no:cacheprovider tests/integration/test_image.py

# Boot the amd64 image in qemu (KVM when /dev/kvm is usable, else TCG): a provisioned copy,
# a TPM from swtpm, a serial console; passes when edge-daemon.service reaches READY.
# Needs qemu-system-x86, swtpm, mtools, e2fsprogs (apt-get install qemu-system-x86 ...).
image-boot: setup
	SOVEREIGN_EDGE_IMAGE=build/sovereign-edge-amd64.img $(PY) -m pytest -q -s -p no:cacheprovider tests/integration/test_image_boot.py

clean:
	rm -rf demo-out .mypy_cache .ruff_cache .pytest_cache
