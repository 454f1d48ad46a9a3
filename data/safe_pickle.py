"""A restricted unpickler for the pickles users download (CIFAR batches, BiP LMDB records).

``pickle.load`` on an untrusted file runs whatever callable the file names (``os.system``,
``builtins.eval``, ...). Every callable a pickle can reach goes through ``find_class`` (GLOBAL,
STACK_GLOBAL, INST, OBJ and the copyreg EXT opcodes all do), and ``persistent_load`` refuses by
default, so refusing in ``find_class`` means nothing outside the allow-list is ever called.

The allow-list never hands out a real library callable either: numpy arrays are rebuilt by *our*
placeholder classes, and the finished object is turned into a real ``np.ndarray`` by
``np.frombuffer`` only after its dtype and size have been checked. So no numpy code runs on the
file's bytes while it is being unpickled.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np

from configs.errors import UserError

# Dtypes a data file may carry: plain little/big-endian numbers, never objects.
_ALLOWED_DTYPES = frozenset({"b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8"})


class _PendingDtype:
    """Stands in for ``numpy.dtype(spec, align, copy)``; its pickled state only sets a byte order."""

    def __init__(self, spec: Any = None, align: Any = False, copy: Any = True) -> None:
        if not isinstance(spec, str) or spec not in _ALLOWED_DTYPES:
            raise pickle.UnpicklingError(f"dtype {spec!r} is not a plain numeric dtype")
        self.spec = spec
        self.byteorder = "|"

    def __setstate__(self, state: Any) -> None:
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 5:
            raise pickle.UnpicklingError("malformed dtype state")
        byteorder, subarray, names, fields = state[1:5]
        if byteorder not in ("<", ">", "|", "=") or subarray is not None or names is not None or fields is not None:
            raise pickle.UnpicklingError("structured or sub-array dtypes are not allowed")
        self.byteorder = byteorder

    def to_numpy(self) -> np.dtype:
        order = "=" if self.byteorder == "|" else self.byteorder
        return np.dtype(order + self.spec)


class _PendingArray:
    """Stands in for ``numpy.core.multiarray._reconstruct(ndarray, shape, typecode)``."""

    def __init__(self, cls: Any = None, shape: Any = None, typecode: Any = None) -> None:
        if cls is not _NDARRAY_MARKER:
            raise pickle.UnpicklingError("_reconstruct may only build a numpy.ndarray")
        self.state: tuple | None = None

    def __setstate__(self, state: Any) -> None:
        # numpy's ndarray state: (version, shape, dtype, is_fortran, raw bytes)
        if not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError("malformed ndarray state")
        self.state = state

    def to_numpy(self) -> np.ndarray:
        if self.state is None:
            raise pickle.UnpicklingError("ndarray without data")
        _, shape, dtype, fortran, raw = self.state
        if not isinstance(dtype, _PendingDtype):
            raise pickle.UnpicklingError("ndarray dtype is not a plain dtype")
        if not (isinstance(shape, tuple) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise pickle.UnpicklingError("malformed ndarray shape")
        if isinstance(raw, str):  # a Python 2 ``str`` read with encoding="latin1"
            raw = raw.encode("latin1")
        if not isinstance(raw, (bytes, bytearray)):
            raise pickle.UnpicklingError("ndarray data is not raw bytes")
        np_dtype = dtype.to_numpy()
        count = int(np.prod(shape, dtype=np.int64))
        if count * np_dtype.itemsize != len(raw):
            raise pickle.UnpicklingError(
                f"ndarray data has {len(raw)} bytes, shape {shape} needs {count * np_dtype.itemsize}")
        array = np.frombuffer(bytes(raw), dtype=np_dtype).reshape(shape, order="F" if fortran else "C")
        return array.copy()  # writable and owning its memory


class _NdarrayMarker:
    """What ``numpy.ndarray`` resolves to: only a token for ``_PendingArray`` to recognise."""


_NDARRAY_MARKER = _NdarrayMarker()


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode``: how Python 3 writes ``bytes`` at pickle protocol <= 2. Only latin1."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed as (str, 'latin1')")
    return text.encode("latin1")


# The globals a numpy-array pickle (CIFAR's python batches) needs, each mapped to a safe stand-in.
NUMPY_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _PendingArray,
    ("numpy._core.multiarray", "_reconstruct"): _PendingArray,
    ("numpy", "ndarray"): _NDARRAY_MARKER,
    ("numpy", "dtype"): _PendingDtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, *, allowed: dict[tuple[str, str], Any], encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(f"{module}.{name}") from None


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class UnsafePickleError(UserError):
    """The pickle names a callable outside the allow-list: refused, never skippable."""


def _materialize(obj: Any, depth: int = 0, done: dict[int, Any] | None = None) -> Any:
    """Replace placeholder arrays by real ones; reject any placeholder left in a wrong place.

    A container the pickle references several times (its memo) is converted once and shared, as
    pickle itself shares it: converting each reference anew would turn a 200-byte file of nested
    references into 10**9 objects.
    """
    if depth > 50:
        raise pickle.UnpicklingError("nesting too deep")
    done = {} if done is None else done
    if id(obj) in done:
        return done[id(obj)]
    result: Any
    if isinstance(obj, _PendingArray):
        result = obj.to_numpy()
    elif isinstance(obj, (_PendingDtype, _NdarrayMarker)) or callable(obj):
        raise pickle.UnpicklingError(f"unexpected object of type {type(obj).__name__}")
    elif isinstance(obj, dict):
        result = {_materialize(k, depth + 1, done): _materialize(v, depth + 1, done) for k, v in obj.items()}
    elif isinstance(obj, list):
        result = [_materialize(v, depth + 1, done) for v in obj]
    elif isinstance(obj, tuple):
        result = tuple(_materialize(v, depth + 1, done) for v in obj)
    else:
        return obj
    done[id(obj)] = result  # obj stays alive inside the unpickled tree, so its id is not reused
    return result


def safe_loads(data: bytes, *, source: str, allowed: dict[tuple[str, str], Any] | None = None,
               encoding: str = "latin1") -> Any:
    """Unpickle ``data`` allowing only plain containers/scalars plus the globals in ``allowed``.

    ``source`` names the file (and key) for the error message. Any refused global, truncated
    stream or malformed array raises ``UserError``; nothing the file names is ever called.
    """
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), allowed=allowed or {}, encoding=encoding).load()
        return _materialize(obj)
    except _ForbiddenGlobal as exc:
        raise UnsafePickleError(
            f"refusing to unpickle {source}: it asks for the callable {exc} which a data file never needs "
            "(the file is corrupt or malicious; nothing was executed; replace it with a copy from the "
            "official source)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, OverflowError, MemoryError, UnicodeError) as exc:
        raise UserError(
            f"cannot read {source}: not a valid data pickle ({type(exc).__name__}: {exc}); "
            "the file is truncated or corrupt, replace it with a fresh copy") from None


def safe_load_file(path: str, *, allowed: dict[tuple[str, str], Any] | None = None,
                   encoding: str = "latin1") -> Any:
    """``safe_loads`` on the whole content of ``path``."""
    with open(path, "rb") as handle:
        data = handle.read()
    return safe_loads(data, source=path, allowed=allowed, encoding=encoding)
