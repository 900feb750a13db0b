"""firmware_config/: the shipped fragments pass the linter, and the linter bites."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
FW = ROOT / "firmware_config"


def _lint() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fw_lint", FW / "lint.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


LINT = _lint()
ALLOWED = LINT.allowed_overlays()
CONFIG = (FW / "config.txt").read_text()


def test_the_shipped_fragments_are_clean_from_the_command_line() -> None:
    out = subprocess.run(
        [sys.executable, str(FW / "lint.py")], capture_output=True, text=True, check=False
    )
    assert (out.returncode, out.stdout) == (0, "")


def test_an_overlay_missing_from_the_list_is_rejected() -> None:
    problems = LINT.lint_config(CONFIG + "dtoverlay=tpm-slb9670x\n", ALLOWED)
    n = len(CONFIG.splitlines()) + 1
    assert problems == [f"config.txt:{n}: overlay 'tpm-slb9670x' is not in overlays.txt"]


def test_each_required_key_is_required() -> None:
    for line in ("dtparam=pciex1_gen=3", "dtparam=spi=on", "dtparam=watchdog=on", "arm_64bit=1"):
        problems = LINT.lint_config(CONFIG.replace(line + "\n", ""), ALLOWED)
        assert any("missing" in p for p in problems), line


def test_a_wrong_value_or_a_key_set_for_another_model_does_not_count() -> None:
    gen2 = LINT.lint_config(CONFIG.replace("pciex1_gen=3", "pciex1_gen=2"), ALLOWED)
    assert gen2 == ["config.txt: dtparam=pciex1_gen='2', required '3'"]
    elsewhere = CONFIG.replace("dtoverlay=tpm-slb9670\n", "") + "[pi4]\ndtoverlay=tpm-slb9670\n"
    assert any("no TPM overlay" in p for p in LINT.lint_config(elsewhere, ALLOWED))


def test_garbage_and_duplicates_are_reported_with_their_line() -> None:
    problems = LINT.lint_config("[pi5]\nthis is not config\narm_64bit=1\narm_64bit=1\n", ALLOWED)
    assert "config.txt:2: not key=value: 'this is not config'" in problems
    assert "config.txt:4: arm_64bit set again (first on line 3)" in problems


def test_cmdline_is_one_line_with_watchdog_rootwait_and_a_partuuid_root() -> None:
    assert LINT.lint_cmdline((FW / "cmdline.txt").read_text()) == []
    assert LINT.lint_cmdline("a\nb\n") == ["cmdline.txt: must be exactly one line, found 2"]
    bad = LINT.lint_cmdline("root=/dev/mmcblk0p2 rootwait fsck.repair=yes\n")
    assert "cmdline.txt: systemd.watchdog_device=/dev/watchdog0 missing" in bad
    assert "cmdline.txt: give the root once, as root=PARTUUID=…" in bad
