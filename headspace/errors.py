"""The one exception type headspace raises for bad input.

The CLI turns it into a one-line message and exit code 2, so every check that a
user can trip (a wrong path, an impossible budget, too little RAM) raises this
rather than a bare ``ValueError`` from deep inside torch or transformers.
"""


class HeadspaceError(ValueError):
    """A request headspace refuses, with a message that says what to change."""
