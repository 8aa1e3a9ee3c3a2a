"""The base of mtd's own errors: each message names the problem and how to fix it.

Entry scripts (train.py, eval.py) print these without a traceback; anything else is a bug and
keeps its traceback.
"""


class MtdError(Exception):
    """A problem with the user's input, data or environment, explained in the message."""
