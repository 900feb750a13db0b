"""Lint the Pi 5 firmware fragments: required keys present, overlays from the allowed list.

Usage: ``python firmware_config/lint.py [config.txt] [cmdline.txt]`` (defaults: the
files beside this script). Exit 0 when clean, 1 with one line per problem. Standard
library only: it runs on the image build host before anything is installed.

Rules (what a sensor needs to boot and do its job):
- config.txt: every key of ``REQUIRED_CONFIG`` set to the required value in a section
  that applies to a Pi 5 (``[all]`` or ``[pi5]``); every ``dtoverlay=`` name (before
  the first comma) is listed in ``overlays.txt``; no line outside ``key=value``,
  ``[filter]``, comments and blanks; no key set twice in one section.
- cmdline.txt: one line; the tokens of ``REQUIRED_CMDLINE`` present; the root given by
  PARTUUID (no initramfs needed to find it).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

REQUIRED_CONFIG: dict[str, str] = {
    "arm_64bit": "1",
    "dtparam=pciex1": "",  # AI HAT+ on the external PCIe connector
    "dtparam=pciex1_gen": "3",
    "dtparam=spi": "on",  # the TPM's bus
    "dtparam=i2s": "on",  # the microphone's bus
    "dtparam=watchdog": "on",
}
REQUIRED_OVERLAY_KINDS = {
    "TPM": re.compile(r"^tpm-slb967[03]$"),
    "I2S microphone": re.compile(r"^(googlevoicehat-soundcard|adau7002-simple)$"),
}
REQUIRED_CMDLINE = ("rootwait", "fsck.repair=yes", "systemd.watchdog_device=/dev/watchdog0")
PI5_SECTIONS = {"all", "pi5"}
LINE = re.compile(r"^(?P<key>[A-Za-z0-9_]+)=(?P<value>\S*)$")


def allowed_overlays(path: Path = HERE / "overlays.txt") -> set[str]:
    lines = (ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines())
    return {ln for ln in lines if ln}


def lint_config(text: str, allowed: set[str]) -> list[str]:
    problems: list[str] = []
    section = "all"
    seen: dict[tuple[str, str], int] = {}
    found: dict[str, str] = {}
    overlays: list[str] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
            continue
        m = LINE.match(line)
        if m is None:
            problems.append(f"config.txt:{n}: not key=value: {raw.strip()!r}")
            continue
        key, value = m["key"], m["value"]
        if key in ("dtparam", "dtoverlay"):
            name, _, arg = value.partition("=")
            if key == "dtoverlay":
                overlay = name.split(",", 1)[0]
                if section in PI5_SECTIONS:
                    overlays.append(overlay)
                if overlay not in allowed:
                    problems.append(f"config.txt:{n}: overlay {overlay!r} is not in overlays.txt")
                continue
            key, value = f"dtparam={name}", arg
        if (section, key) in seen:
            problems.append(f"config.txt:{n}: {key} set again (first on line {seen[section, key]})")
        seen[section, key] = n
        if section in PI5_SECTIONS:
            found[key] = value
    for key, want in REQUIRED_CONFIG.items():
        if key not in found:
            problems.append(f"config.txt: {key} missing (required for a Pi 5 sensor)")
        elif found[key] != want:
            problems.append(f"config.txt: {key}={found[key]!r}, required {want!r}")
    for kind, pattern in REQUIRED_OVERLAY_KINDS.items():
        if not any(pattern.match(o) for o in overlays):
            problems.append(f"config.txt: no {kind} overlay ({pattern.pattern})")
    return problems


def lint_cmdline(text: str) -> list[str]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) != 1:
        return [f"cmdline.txt: must be exactly one line, found {len(lines)}"]
    tokens = lines[0].split()
    problems = [f"cmdline.txt: {t} missing" for t in REQUIRED_CMDLINE if t not in tokens]
    roots = [t for t in tokens if t.startswith("root=")]
    if len(roots) != 1 or not roots[0].startswith("root=PARTUUID="):
        problems.append("cmdline.txt: give the root once, as root=PARTUUID=…")
    return problems


def main(argv: list[str]) -> int:
    config = Path(argv[0]) if argv else HERE / "config.txt"
    cmdline = Path(argv[1]) if len(argv) > 1 else HERE / "cmdline.txt"
    problems = lint_config(config.read_text(), allowed_overlays())
    problems += lint_cmdline(cmdline.read_text())
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
