"""The errors t2i raises for bad input: the CLI prints their message alone, without a traceback."""


class T2IError(Exception):
    """A problem with what the user asked for; the message says what and how to fix it."""


class ConfigError(T2IError, ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""
