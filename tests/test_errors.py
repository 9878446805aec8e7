"""The package's errors: one base, builtins kept for old `except` clauses, fields the CLI rewords, and errors that
cross processes (every process of a launch raises the same one) whole."""

import pickle

import pytest

import ia3_trainer
from ia3_trainer import errors


ERRORS = [errors.RecipeError, errors.DataError, errors.InputError, errors.PathError, errors.RunFolderError,
          errors.HubError, errors.MissingPackageError, errors.NonFiniteLossError, errors.ProcessesDisagreeError]


def test_every_error_is_exported_and_derives_from_the_base():
    for cls in ERRORS:
        assert issubclass(cls, ia3_trainer.IA3TrainerError) and getattr(ia3_trainer, cls.__name__) is cls
        assert cls.__name__ in ia3_trainer.__all__
    # What each used to be, so that `except ValueError` / `except OSError` written before still catches it.
    assert issubclass(errors.RecipeError, ValueError) and issubclass(errors.DataError, errors.RecipeError)
    assert issubclass(errors.RunFolderError, FileExistsError) and issubclass(errors.PathError, OSError)
    assert issubclass(errors.MissingPackageError, ImportError) and issubclass(errors.HubError, OSError)


def test_fields_make_the_message_and_a_caller_rewords_key_and_fix_only():
    error = errors.PathError(key="merged_dir", problem="overwrite=True/m is not empty",
                             fix="pass overwrite=True to replace it")
    assert str(error) == "merged_dir: overwrite=True/m is not empty; pass overwrite=True to replace it"
    words = {"merged_dir": "MERGED_DIR", "overwrite=True": "--overwrite"}
    assert error.describe(words) == "MERGED_DIR: overwrite=True/m is not empty; pass --overwrite to replace it"
    assert errors.InputError("a whole message").describe(words) == "a whole message"


@pytest.mark.parametrize("error", [
    errors.RunFolderError(key="training.output_dir", problem="is in use", fix="wait"),
    errors.RecipeError(["r.json: a: bad", "r.json: b: bad"]),
    errors.ProcessesDisagreeError(key="training.output_dir", problem="no common checkpoint"),
    errors.HubError("could not push"),
], ids=lambda error: type(error).__name__)
def test_errors_cross_processes_whole(error):
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and str(again) == str(error)
    assert (again.key, again.problem, again.fix) == (error.key, error.problem, error.fix)
    assert getattr(again, "errors", None) == getattr(error, "errors", None)
