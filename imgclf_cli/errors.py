"""Errors the CLI turns into one clear line on stderr (``Error: ...`` / ``Hint: ...``)."""

from __future__ import annotations


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


class ConfigError(ImgclfError):
    """An invalid config file, key or value."""


class DatasetError(ImgclfError):
    """A missing, empty or unusable dataset."""


class RunNotFoundError(ImgclfError):
    """A run that does not exist in the store."""


class RunFileError(RunNotFoundError):
    """A file of a run folder that is missing or damaged (the message names it)."""


class ModelError(ImgclfError):
    """An unknown model name or a model file that cannot be loaded."""


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
