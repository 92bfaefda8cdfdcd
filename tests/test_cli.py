"""The `digitgen` command explains itself: grouped help, defaults shown, --params anywhere, --version."""

from __future__ import annotations

import argparse
import importlib.metadata

import pytest

from digitgen.cli import build_parser, main


def test_help_groups_the_commands_by_purpose_and_lists_every_one(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    groups = ["Use a trained model", "Pipeline stages", "Maintenance and CI"]
    assert [text.index(g) for g in groups] == sorted(text.index(g) for g in groups)
    commands = build_parser()._subparsers._group_actions[0].choices
    assert all(f"\n  {name} " in text for name in commands)
    assert text.index("\n  generate ") < text.index("Pipeline stages") < text.index("\n  train ")


def test_every_option_has_help_and_shows_its_default():
    for name, command in build_parser()._subparsers._group_actions[0].choices.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.dest} has no help text"
            help_text = command.formatter_class(name)._get_help_string(action)
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "(default: %(default)s)" in help_text, f"{name} {action.dest}"


def test_params_is_accepted_before_or_after_the_command(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {mirrors: [x], train_size: 0}\n")
    for argv in (["--params", str(bad), "download"], ["download", "--params", str(bad)]):
        assert main([*argv, "--out", str(tmp_path / "raw")]) == 2
        assert f"{bad}: data.train_size must be a positive integer" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"digitgen {importlib.metadata.version('digitgen')}"
