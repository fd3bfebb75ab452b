"""Errors caused by what a user gave us (a config field, a file, a path). The CLI prints their message,
which names the field or file, and exits with status 2 instead of a traceback."""


class UserInputError(Exception):
    """Base of every bad-input error."""
