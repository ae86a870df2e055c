"""The library's own exception types.

Every error a user can cause (a bad config, a missing file, an empty corpus, a model that does not fit)
is raised as a subclass of :class:`LoraDaptError`, with a message that names the problem and the fix.
Catching ``LoraDaptError`` therefore catches every "you asked for something wrong" case and nothing else.
"""

from __future__ import annotations


class LoraDaptError(Exception):
    """Base class of every error lora_dapt raises on purpose."""


class ConfigError(LoraDaptError, ValueError):
    """One or more configuration problems; ``problems`` lists each one as a readable line."""

    def __init__(self, problems: list[str] | str, header: str = "invalid configuration") -> None:
        self.problems = [_bounded(p) for p in ([problems] if isinstance(problems, str) else problems)]
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"{header} ({n} problem{'s' if n != 1 else ''}):\n{lines}")


class DataError(LoraDaptError, ValueError):
    """The corpus or dataset cannot be used (empty, unreadable, malformed rows)."""


class ModelLoadError(LoraDaptError, OSError):
    """A model, tokenizer or adapter could not be found or loaded."""


class TrainingError(LoraDaptError, RuntimeError):
    """Training stopped for a reason the user must act on (non-finite loss, out of memory, ...)."""


class MergeError(LoraDaptError, RuntimeError):
    """An adapter merge failed or did not verify."""


class ExportError(LoraDaptError, RuntimeError):
    """A model could not be exported (an unsupported architecture or tokenizer) or its file did not verify."""


class RunDirError(LoraDaptError, FileNotFoundError):
    """A run directory, or one of its files, is missing or unreadable."""


_PROBLEM_CHARS = 2000  # the longest one problem line may be (a message is read by a person)


def _bounded(problem: str) -> str:
    text = str(problem)
    return (
        text
        if len(text) <= _PROBLEM_CHARS
        else f"{text[: _PROBLEM_CHARS - 30]}... ({len(text):,} characters)"
    )
