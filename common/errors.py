"""Errors the CLI reports as one line instead of a traceback: what a user gave us was wrong (a config
field, a file, a path: the message names it; exit status 2), or a learner rank died (exit status 1)."""


class UserInputError(Exception):
    """Base of every bad-input error."""


class LearnerFailed(RuntimeError):
    """A learner rank died: its optimiser partition is gone, so the job stops; the last checkpoint resumes it."""


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (parsers' messages span several), or its type's name."""
    return (str(err).splitlines() or [type(err).__name__])[0]
