"""The import rules between the parts, read from one place (``pyproject.toml``).

``[tool.sovereign-edge.imports]`` says which first-party packages each part may import,
which modules it must never import, and which modules are composition roots (imported
only by their own package's ``__main__``). Every ``import`` counts, including those
inside functions and relative ones. The last tests show the checker fails on a
forbidden import in a temporary module, so a rule that no longer bites is noticed.
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Rules:
    allowed: dict[str, list[str]]
    forbidden: dict[str, list[str]]
    composition_roots: list[str]


def load_rules(pyproject: Path = ROOT / "pyproject.toml") -> Rules:
    cfg = tomllib.loads(pyproject.read_text())["tool"]["sovereign-edge"]["imports"]
    return Rules(cfg["allowed"], cfg.get("forbidden", {}), cfg.get("composition_roots", []))


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, wherever it sits."""
    me = _module_name(root, path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            found.append((node.lineno, mod))
            # `from pkg import submodule` imports pkg.submodule too
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names if a.name != "*"]
    return found


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(root: Path, rules: Rules) -> list[str]:
    """Every forbidden import under ``root``, as ``file:line: reason`` lines."""
    parts = set(rules.allowed)
    out: list[str] = []
    for part, allowed in rules.allowed.items():
        for path in sorted((root / part).rglob("*.py")):
            rel = path.relative_to(root)
            me = _module_name(root, path)
            for line, name in imports_of(root, path):
                top = name.split(".")[0]
                if top in parts and top != part and top not in allowed:
                    out.append(f"{rel}:{line}: {part} may not import {top}")
                for bad in rules.forbidden.get(part, []):
                    if _matches(name, bad):
                        out.append(f"{rel}:{line}: {part} must never import {bad}")
                for app in rules.composition_roots:
                    own = app.split(".")[0] == part
                    if own and _matches(name, app) and me not in (f"{part}.__main__", app):
                        out.append(f"{rel}:{line}: only {part}.__main__ may import {app}")
    return sorted(set(out))


def test_the_rules_cover_every_part_of_the_design() -> None:
    rules = load_rules()
    assert set(rules.allowed) >= {
        "fleet_protocol",
        "fleet_model",
        "edge_daemon",
        "cloud_sidecar",
        "devstack",
    }
    assert rules.allowed["fleet_protocol"] == []
    assert set(rules.allowed["fleet_model"]) == {"fleet_protocol"}
    for service in ("edge_daemon", "cloud_sidecar"):
        assert "devstack" not in rules.allowed[service]
    assert "cloud_sidecar" not in rules.allowed["edge_daemon"]
    assert "edge_daemon" not in rules.allowed["cloud_sidecar"]


def test_no_part_imports_across_its_boundaries() -> None:
    found = violations(ROOT, load_rules())
    assert not found, "forbidden imports:\n" + "\n".join(found)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("module", "text", "reason"),
    [
        (
            "edge_daemon/leak.py",
            "def f():\n    from cloud_sidecar.store import Store\n",
            "edge_daemon may not import cloud_sidecar",
        ),
        (
            "cloud_sidecar/sim.py",
            "import devstack.scene\n",
            "cloud_sidecar may not import devstack",
        ),
        ("fleet_model/x.py", "import edge_daemon\n", "fleet_model may not import edge_daemon"),
        ("fleet_model/t.py", "def f():\n    import torch\n", "must never import torch"),
        ("edge_daemon/ml.py", "import torch.nn\n", "must never import torch"),
        ("cloud_sidecar/train.py", "from . import app\n", "only cloud_sidecar.__main__"),
        ("cloud_sidecar/dataset.py", "from .app import x\n", "only cloud_sidecar.__main__"),
    ],
)
def test_a_forbidden_import_in_a_temporary_module_fails_the_check(
    tmp_path: Path, module: str, text: str, reason: str
) -> None:
    files = {f"{p}/__init__.py": "" for p in load_rules().allowed}
    root = _tree(tmp_path, {**files, module: text})
    found = violations(root, load_rules())
    assert any(reason in v and module in v for v in found), found


def test_allowed_imports_and_the_entry_point_pass_the_check(tmp_path: Path) -> None:
    files = {f"{p}/__init__.py": "" for p in load_rules().allowed}
    root = _tree(
        tmp_path,
        {
            **files,
            "cloud_sidecar/__main__.py": "from cloud_sidecar.app import SidecarApp\n",
            "cloud_sidecar/train.py": "from fleet_model import merge_and_quantize\n",
            "devstack/demo.py": "import edge_daemon.app\nimport cloud_sidecar.app\n",
        },
    )
    assert violations(root, load_rules()) == []
