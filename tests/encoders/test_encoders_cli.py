"""``brainalign encoders`` lists the registry."""

from __future__ import annotations

import argparse

import pytest

from brainalign.cli import encoders as cli_encoders
from brainalign.encoders import list_encoders


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="brainalign")
    cli_encoders.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_encoders_command_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse(["encoders"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    # MNE's logger (braindecode's deprecation notes) may print to stdout too: start at the header
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("name")) :]
    assert lines[0].split()[:3] == ["name", "modalities", "subject-aware"]
    assert "params@63x250 D=768" in lines[0]
    rows = {line.split()[0]: line for line in lines[1:] if line and line[0].isalpha()}
    assert set(list_encoders()) <= set(rows)
    assert "2.39M" in rows["nice"] and "no" in rows["nice"].split()
    assert "2.84M" in rows["atms"] and "yes" in rows["atms"].split()
    assert "88.9k" in rows["eegnet"]
    assert "fmri" in rows["mlp"] and "*" in rows["mlp"]


def test_encoders_command_names_only(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse(["encoders", "list", "--names"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.split() == list_encoders()


def test_encoders_command_reports_shapes_an_encoder_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse(["encoders", "--n-times", "50"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "- nice: NICE cannot take input shape (n_chans=63, n_times=50)" in out
