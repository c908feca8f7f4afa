"""The errors t2i raises for bad input: the CLI prints their message alone, without a traceback."""


class T2IError(Exception):
    """A problem with what the user asked for; the message says what and how to fix it."""


class ConfigError(T2IError, ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


def first_few(items: list[str], shown: int = 3, separator: str = ", ") -> str:
    """The first `shown` of `items`, then how many more: enough to act on, and the message stays one line."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return separator.join(items[:shown]) + more
