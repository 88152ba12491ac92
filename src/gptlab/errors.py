"""The error type gptlab raises for bad input.

The CLI prints a :class:`GptlabError` as one line, ``error: <message>``, and exits
with status 1. Messages say what was wrong, where, and what to do.
"""


class GptlabError(Exception):
    """Bad input or state the user can fix; the message says how."""
