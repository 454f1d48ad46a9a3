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


# torch.utils.data re-raises an exception from a DataLoader worker in the main process as the same
# type, its message replaced by "Caught <Type> in DataLoader worker process N.\nOriginal Traceback
# (most recent call last):\n..." ending in the worker's "<module>.<Type>: <message>" line.
_WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):\n"


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as the one line ``train.py`` prints.

    A UserError raised in a DataLoader worker arrives with the worker's traceback as its message;
    this gives back the original message. Any line break left (a file name holding one) becomes
    a space, so the error never spills over several lines.
    """
    text = str(exc)
    if text.startswith(f"Caught {type(exc).__name__} ") and _WORKER_TRACEBACK in text:
        cls = type(exc)
        builtin = cls.__module__ in ("__main__", "builtins")
        name = cls.__qualname__ if builtin else f"{cls.__module__}.{cls.__qualname__}"
        marker = f"\n{name}: "  # as the traceback module writes the exception's last line
        cut = text.rfind(marker)
        if cut >= 0:  # the last one: in a chained traceback the exception raised comes last
            text = text[cut + len(marker):]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
