"""The two error kinds a command-line tool answers in one line with exit status 2, never a traceback."""


class ConfigError(ValueError):
    """Bad input from the user (a flag, a path, a file): command-line tools print it on one line and exit 2."""


class ServiceError(ConnectionError):
    """A service the command needs (the broker) cannot be reached, does not answer, or refused us; the message
    names the cause and what to do. Printed on one line, exit 2, like ConfigError."""
