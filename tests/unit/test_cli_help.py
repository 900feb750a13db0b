"""Every console-script subcommand answers --help (exit 0, usage text)."""

from __future__ import annotations

import argparse

import pytest

from cloud_sidecar.__main__ import build_parser as cloud_parser
from edge_daemon.__main__ import build_parser as edge_parser


def _subcommand_paths(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += _subcommand_paths(sub, (*prefix, name))
    return paths


@pytest.mark.parametrize(
    ("build", "path"),
    [(edge_parser, p) for p in _subcommand_paths(edge_parser())]
    + [(cloud_parser, p) for p in _subcommand_paths(cloud_parser())],
)
def test_every_subcommand_prints_help_and_exits_zero(
    build: object, path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build()  # type: ignore[operator]
    argv = [*path, "--help"]
    if len(path) > 1 and path[0] in ("fleet", "ota"):  # --config belongs to the group
        argv = [path[0], "--config", "x.json", *path[1:], "--help"]
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out
