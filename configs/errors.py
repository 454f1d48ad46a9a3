"""The two exception types a run ends with, besides success.

Anything a user can fix (a wrong flag, a missing file, a mismatched checkpoint) raises
``UserError`` with a one-line message that names the problem and the fix. ``train.py`` prints
it as ``error: <message>`` and exits with status 2, without a traceback; nothing is written then.

``RunStopped`` is a run that was going well and could not go on for a reason outside its input
(the disk filled up, the file system turned read-only). It is printed the same way but exits
with status 1: the input was fine, so a script should not treat it as a usage error. Its
message says what is kept (the last complete checkpoint) and how to continue.

Programming errors stay ordinary exceptions so that they keep their tracebacks.
"""


class UserError(Exception):
    """Bad input that the user can fix; the message is one line naming the problem and the fix."""


class RunStopped(Exception):
    """The run stopped for an outside reason; one line saying what is kept and how to continue."""
