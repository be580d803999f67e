"""Errors the CLI turns into one clear line on stderr (``Error: ...`` / ``Hint: ...``)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ImgclfError(Exception):
    """A problem with the user's input or environment, reported without a traceback.

    ``message`` says what is wrong (and the value received); ``hint`` says how to fix it.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(ImgclfError):
    """Wrong command-line usage (bad --set, unknown option value): exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """An invalid config file, key or value (exit code 2, like the --set or flag that gave it)."""


class DatasetError(ImgclfError):
    """A missing, empty or unusable dataset."""


class RunNotFoundError(ImgclfError):
    """A run that does not exist in the store."""


class RunFileError(RunNotFoundError):
    """A file of a run folder that is missing or damaged (the message names it)."""


class StoreError(ImgclfError):
    """The run store cannot be written (read-only, full, no permission)."""


class ModelError(ImgclfError):
    """A model that cannot be built or loaded (an unknown model name is a ``ConfigError``)."""


class TrainingInterrupted(ImgclfError):
    """Training stopped by Ctrl-C; the run was kept and can be resumed."""

    exit_code = 130


class ExportVerificationError(ImgclfError):
    """An exported model whose answers differ from the trained model's beyond the thresholds.

    The artifacts were written; ``report`` (an ``imgclf_cli.exporting.ExportReport``) lists
    them with their verification numbers, so a caller can still show or inspect them.
    """

    def __init__(self, message: str, hint: str | None = None, report: object = None) -> None:
        super().__init__(message, hint)
        self.report = report


def closest(received: str, choices: Iterable[str]) -> list[str]:
    """The (at most three) ``choices`` closest to ``received``, closest first; ``[]`` when none is."""
    # A little above difflib's 0.6: at 0.6 "epochs" also drew warmup_epochs and "batch_size"
    # image_size, while typos (epoch, optimzer, ture, memroy, resnet5) all score 0.75 or more.
    return difflib.get_close_matches(received, list(choices), n=3, cutoff=0.65)


def did_you_mean(message: str, names: list[str]) -> str:
    """``message``, then "Did you mean a, b or c?" when there are ``names`` to suggest."""
    if not names:
        return message
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return f"{message}. Did you mean {listed}?"
