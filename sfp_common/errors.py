"""The one error type that means "the user asked for something impossible"."""


class ConfigError(ValueError):
    """Bad input from the user (a flag, a path, a file): command-line tools print it on one line and exit 2."""
