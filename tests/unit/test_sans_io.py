"""The sans-IO core of fleet_protocol imports no network, MQTT or file-writing adapter,
and the device path imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = [p for p in Path("fleet_protocol").glob("*.py")]
FORBIDDEN = {"socket", "ssl", "paho", "fleet_protocol.io", "sqlite3", "subprocess"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_modules_import_no_io() -> None:
    assert CORE, "no core modules found"
    for path in CORE:
        bad = {n for n in _imports(path) if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)}
        assert not bad, f"{path} imports {bad}"


def test_device_path_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import edge_daemon.app, edge_daemon.pipeline, edge_daemon.ota, edge_daemon.inference.adapter\n"
        "import edge_daemon.privacy.gate, edge_daemon.keys.tpm, edge_daemon.__main__\n"
        "import edge_daemon.inference.backends.litert, fleet_model.tflite_patch\n"
        "heavy = ('torch', 'peft', 'transformers', 'tensorflow', 'keras')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
