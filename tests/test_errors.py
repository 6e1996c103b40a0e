"""One base class for bad input: every exception the package raises for input a user can fix is a UserError, the
commands report it as one line with exit status 2, and the trainer reports it once or on the rank that hit it."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import ds_orthoadam
from ds_orthoadam import train
from ds_orthoadam.checkpointing import CheckpointError
from ds_orthoadam.cli import EXIT_BAD_INPUT, run_main
from ds_orthoadam.data.errors import DataArgumentError, DataSourceError, TokenizerError
from ds_orthoadam.errors import OutputPathError, UserError
from ds_orthoadam.export import ExportError
from ds_orthoadam.run_config import RunConfigError


def _package_exceptions() -> dict[str, type]:
    found = {}
    for info in pkgutil.walk_packages(ds_orthoadam.__path__, "ds_orthoadam."):
        if info.name.endswith("__main__"):  # importing it runs the command
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, Exception) and value.__module__ == info.name:
                found[f"{info.name}.{name}"] = value
    return found


def test_every_exception_of_the_package_is_a_user_error_but_the_deliberate_stop():
    exceptions = _package_exceptions()
    assert len(exceptions) > 15  # the walk found the package's error classes
    not_user_errors = sorted(name for name, cls in exceptions.items() if not issubclass(cls, UserError))
    assert not_user_errors == ["ds_orthoadam.train.TrainingStopped"]


@pytest.mark.parametrize("cls, rank_specific", [
    (RunConfigError, False), (train.ArgumentConflict, False), (TokenizerError, False), (DataArgumentError, False),
    (DataSourceError, True), (CheckpointError, True), (ExportError, True), (OutputPathError, True)])
def test_who_reports_an_error(cls, rank_specific):
    assert cls.rank_specific is rank_specific


def test_run_main_turns_a_user_error_into_one_line_and_exit_2(capsys):
    def fail() -> None:
        raise DataArgumentError("--data x: no such file")

    assert run_main(fail) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == "error: --data x: no such file\n"
    assert run_main(lambda: "done") == 0
    assert capsys.readouterr().out == "done\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_main(lambda: str(1 / 0))


@pytest.mark.parametrize("rank, error, printed", [
    ("0", TokenizerError("tokenizer t does not exist"), "error: tokenizer t does not exist\n"),
    ("1", TokenizerError("tokenizer t does not exist"), ""),
    ("0", DataSourceError("rank 0 gets no document"), "error: rank 0 gets no document\n"),
    ("1", DataSourceError("rank 1 gets no document"), "error: rank 1: rank 1 gets no document\n")])
def test_the_trainer_prints_a_shared_error_on_rank_0_and_a_rank_error_on_its_rank(rank, error, printed, capsys,
                                                                                 monkeypatch):
    monkeypatch.setenv("RANK", rank)
    assert train._fail_user_error(error) == EXIT_BAD_INPUT
    assert capsys.readouterr().err == printed
