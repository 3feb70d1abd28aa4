"""The one exception type for user errors: the CLI prints its message on one line and exits non-zero."""


class SecateursError(Exception):
    """A problem with the user's input or environment (bad path, bad recipe, offline hub ...)."""


class Interrupted(SecateursError):
    """The user interrupted (Ctrl-C); the message says what was kept. The command exits 130."""
