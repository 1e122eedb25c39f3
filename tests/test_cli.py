"""Shared CLI conventions: argument types and user errors as one line with exit code 2."""

import argparse

import pytest

from kvzap_lab import cli


def test_run_turns_user_errors_into_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("KVZAP_LAB_DEBUG", raising=False)

    def main(argv):
        raise FileNotFoundError("checkpoint /x/config.json does not exist;\n  train one first")

    assert cli.run(main, [], prog="kvzap-lab train") == 2
    err = capsys.readouterr().err
    assert err == "kvzap-lab train: error: checkpoint /x/config.json does not exist; train one first\n"


def test_run_passes_exit_codes_and_real_bugs(monkeypatch):
    monkeypatch.delenv("KVZAP_LAB_DEBUG", raising=False)
    assert cli.run(lambda argv: 0, []) == 0
    with pytest.raises(KeyError):  # a bug is not a user error: its traceback stays
        cli.run(lambda argv: {}["missing"], [])


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("KVZAP_LAB_DEBUG", "1")
    with pytest.raises(ValueError):
        cli.run(lambda argv: int("x"), [])


@pytest.mark.parametrize(
    "parse, text, expected",
    [
        (cli.positive_int, "3", 3),
        (cli.non_negative_int, "0", 0),
        (cli.finite_float, "-1.5", -1.5),
        (cli.fraction(), "1", 1.0),
        (cli.fraction(0, 1, high_open=True), "0", 0.0),
    ],
)
def test_types_accept(parse, text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize(
    "parse, text, message",
    [
        (cli.positive_int, "0", "must be an int >= 1; got 0"),
        (cli.positive_int, "2.5", "must be an integer; got '2.5'"),
        (cli.non_negative_int, "-1", "must be an int >= 0; got -1"),
        (cli.finite_float, "nan", "must be a finite number; got nan"),
        (cli.finite_float, "abc", "must be a number; got 'abc'"),
        (cli.fraction(), "1.5", r"must be in [0, 1]; got 1.5"),
        (cli.fraction(0, 1, high_open=True), "1", r"must be in [0, 1); got 1"),
    ],
)
def test_types_refuse_with_the_rule(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as err:
        parse(text)
    assert str(err.value) == message


def _parser():
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--tasks", nargs="+", action=cli.ListOption, allowed=["a", "b", "c"], default=["a"])
    parser.add_argument("--n-samples", type=cli.positive_int, default=5)
    parser.add_argument("--n", type=cli.positive_int, dest="n_samples", action=cli.DeprecatedAlias, new="--n-samples", help=argparse.SUPPRESS)
    return parser


def test_list_option_takes_spaces_and_the_old_commas(capsys):
    assert _parser().parse_args(["--tasks", "a", "c"]).tasks == ["a", "c"]
    assert capsys.readouterr().err == ""
    assert _parser().parse_args(["--tasks", "b,c"]).tasks == ["b", "c"]
    assert "--tasks a,b is deprecated; write --tasks b c" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["--tasks", "a,x"])
    assert exit_.value.code == 2 and "unknown ['x']; choose from a, b, c" in capsys.readouterr().err


def test_deprecated_alias_stores_into_the_new_option(capsys):
    assert _parser().parse_args(["--n", "7"]).n_samples == 7
    assert "--n is deprecated; use --n-samples" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["--n", "0"])  # the alias keeps the new option's type
