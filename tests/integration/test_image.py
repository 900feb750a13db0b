"""Inspect a built device image (`make image ARCH=amd64`, then `make image-test`).

Runs when asked: set SOVEREIGN_EDGE_IMAGE to the image (the make target does). Reads
the image as files, with no loop device or mount: `sfdisk --json` for the partition
table, mtools for the FAT boot partition, debugfs for the ext4 root and data
partitions, then `systemd-analyze verify --root` on the units as installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("SOVEREIGN_EDGE_IMAGE", "")
TOOLS = ("sfdisk", "mdir", "mtype", "debugfs", "systemd-analyze")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not IMAGE, reason="set SOVEREIGN_EDGE_IMAGE (make image-test)"),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in TOOLS), reason=f"needs {', '.join(TOOLS)}"
    ),
]
SITE = "/opt/sovereign-edge/venv/lib/python3.11/site-packages"


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=300).stdout


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The partition table's entries, each cut out of the image into its own file."""
    img = Path(IMAGE)
    assert img.is_file(), f"{img}: no image; run `make image ARCH=amd64` first"
    table = json.loads(_run("sfdisk", "--json", str(img)))["partitiontable"]
    out = tmp_path_factory.mktemp("image")
    (out / "table.json").write_text(json.dumps(table))
    names = ("boot", "root", "data")
    assert len(table["partitions"]) == len(names)
    with img.open("rb") as f:
        for name, p in zip(names, table["partitions"], strict=True):
            f.seek(p["start"] * 512)
            with (out / f"{name}.img").open("wb") as dst:
                left = p["size"] * 512
                while left:
                    chunk = f.read(min(left, 1 << 24))
                    assert chunk
                    dst.write(chunk)
                    left -= len(chunk)
    return {"table": out / "table.json", **{n: out / f"{n}.img" for n in names}}


def _debugfs(image: Path, command: str) -> str:
    return _run("debugfs", "-R", command, str(image))


def test_the_partition_table_has_a_fat_boot_a_root_and_a_data_partition(
    parts: dict[str, Path],
) -> None:
    table = json.loads(parts["table"].read_text())
    assert table["label"] == "dos" and table["id"] == "0x5e0e0001"
    types = [p["type"] for p in table["partitions"]]
    assert types == ["c", "83", "83"]
    assert table["partitions"][0].get("bootable") is True
    for name, label in (("root", "rootfs"), ("data", "se-data")):
        assert f"Filesystem volume name:   {label}" in _run("dumpe2fs", "-h", str(parts[name]))


def test_the_boot_partition_holds_the_linted_firmware_config_and_no_secret(
    parts: dict[str, Path],
) -> None:
    listing = _run("mdir", "-b", "-i", str(parts["boot"]), "::/")
    for name in ("config.txt", "cmdline.txt", "sovereign-edge"):
        assert f"::/{name}" in listing
    config = _run("mtype", "-i", str(parts["boot"]), "::/config.txt")
    assert config.replace("\r\n", "\n") == (ROOT / "firmware_config" / "config.txt").read_text()
    shipped = _run("mdir", "-b", "-i", str(parts["boot"]), "::/sovereign-edge")
    assert shipped.split() == ["::/sovereign-edge/README.txt"]  # no claim, key or config
    cmdline = _run("mtype", "-i", str(parts["boot"]), "::/cmdline.txt")
    assert "root=PARTUUID=5e0e0001-02" in cmdline and "@ROOT_PARTUUID@" not in cmdline


def test_the_root_holds_the_daemon_without_torch_and_mounts_read_only(
    parts: dict[str, Path],
) -> None:
    root = parts["root"]
    site = _debugfs(root, f"ls -p {SITE}")
    for pkg in ("onnxruntime", "tpm2_pytss", "silero_vad", "edge_daemon", "fleet_protocol"):
        assert f"/{pkg}/" in site, pkg
    assert "/torch/" not in site and "/cloud_sidecar/" not in site and "/devstack/" not in site
    assert "Type: regular" in _debugfs(root, "stat /opt/sovereign-edge/venv/bin/edge-daemon")
    # package data, not only modules: the second speech check's model (pyproject package-data)
    data = _debugfs(root, f"ls -p {SITE}/edge_daemon/privacy/data")
    assert "/speech_check.onnx/" in data and "/speech_check.json/" in data, data
    fstab = _debugfs(root, "cat /etc/fstab")
    assert any(
        line.split()[:4] == ["LABEL=rootfs", "/", "ext4", "ro,noatime,errors=remount-ro"]
        for line in fstab.splitlines()
        if line and not line.startswith("#")
    )
    groups = {ln.split(":")[0]: ln for ln in _debugfs(root, "cat /etc/group").splitlines()}
    assert "edge-daemon" in groups["audio"] and "edge-daemon" in groups["tss"]


def test_units_are_enabled_and_verify_cleanly_as_installed(
    parts: dict[str, Path], tmp_path: Path
) -> None:
    root = parts["root"]
    wants = _debugfs(root, "ls -p /etc/systemd/system/multi-user.target.wants")
    for unit in ("edge-daemon.service", "edge-firstboot.service"):
        assert f"/{unit}/" in wants, wants
    for unit in ("systemd-time-wait-sync.service", "systemd-timesyncd.service"):
        assert unit in _debugfs(root, "ls -p /etc/systemd/system/sysinit.target.wants")
    tree = tmp_path / "root"
    for d in ("/etc/systemd", "/usr/lib/systemd", "/opt/sovereign-edge/lib"):
        dest = tree / Path(d).parent.relative_to("/")
        dest.mkdir(parents=True, exist_ok=True)
        _debugfs(root, f"rdump {d} {dest}")  # writes dest/<basename of d>
    bin_dir = tree / "opt/sovereign-edge/venv/bin"
    bin_dir.mkdir(parents=True)
    _debugfs(root, f"dump -p /opt/sovereign-edge/venv/bin/edge-daemon {bin_dir / 'edge-daemon'}")
    out = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            f"--root={tree}",
            "--no-pager",
            "edge-daemon.service",
            "edge-firstboot.service",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


def test_the_data_partition_has_state_config_and_clock_directories(
    parts: dict[str, Path],
) -> None:
    listing = _debugfs(parts["data"], "ls -p /")
    for d in ("state", "etc", "timesync"):
        assert f"/{d}/" in listing
