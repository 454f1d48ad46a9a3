"""The one exception type for bad user input.

Anything a user can fix (a wrong flag, a missing file, a mismatched checkpoint) raises
``UserError`` with a one-line message that names the problem and the fix. ``train.py`` prints
it as ``error: <message>`` and exits with status 2, without a traceback. Programming errors stay
ordinary exceptions so that they keep their tracebacks.
"""


class UserError(Exception):
    """Bad input that the user can fix; the message is one line naming the problem and the fix."""
