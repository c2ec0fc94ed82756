"""The base of every HTTP library's "broken encrypted stream" error.

A stream fails after its response was handed over, inside the HTTP library's own reading
code, so what it raises must be that library's error type (``httpx2.TransportError``,
``aiohttp.ClientPayloadError``) for clients and SDKs to treat it as a broken transfer - and
also the pqe2ee error the engine raised (``DecryptError``, ``StreamError``, ...), so that
``except pqe2ee.DecryptError`` works the same whatever carried the stream.

Each library module declares, once and by name, its root class and one subclass per pqe2ee
error class a stream can fail with::

    class E2EEStreamError(StreamErrorBase, httpx2.TransportError): ...
    class E2EEStreamDecryptError(E2EEStreamError, DecryptError): ...

Declaring a subclass registers it with its root (:meth:`StreamErrorBase.__init_subclass__`);
:meth:`StreamErrorBase.wrap` picks the class for an engine error by walking the error's MRO,
so a pqe2ee class without its own variant gets its nearest declared ancestor's. The classes
are ordinary module-level classes: they pickle (:meth:`StreamErrorBase.__reduce__`), show
their real names in tracebacks, and are documented where they are declared.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

from pqe2ee.errors import PQE2EEError

__all__ = ["StreamErrorBase"]


def _rebuild(cls: type[StreamErrorBase], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    """Unpickle a stream error: no constructor runs (the library's may need a request)."""
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class StreamErrorBase(PQE2EEError):
    """Base of the per-library stream errors (see the module docstring).

    ``code``, ``message`` and the other attributes are the original error's; ``error`` is the
    original exception itself.
    """

    #: pqe2ee class -> this library's class for it; one dict per library root.
    _variants: ClassVar[dict[type[PQE2EEError], type[StreamErrorBase]]]
    #: Attributes pickled as ``None`` (a library's request object, say).
    _unpicklable: ClassVar[tuple[str, ...]] = ()

    error: PQE2EEError

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if StreamErrorBase in cls.__bases__:  # a library's root class
            cls._variants = {PQE2EEError: cls}
            return
        for base in cls.__bases__:
            if issubclass(base, PQE2EEError) and not issubclass(base, StreamErrorBase):
                cls._variants[base] = cls

    @classmethod
    def wrap(cls, error: PQE2EEError) -> Self:
        """``error`` as an instance of this library's class for it (same code, message and
        attributes); an error that already is one is returned as it is."""
        if isinstance(error, cls):
            return error
        variant: Any = next(v for k in type(error).__mro__ if (v := cls._variants.get(k)))
        exc: Self = variant.__new__(variant)
        exc.__dict__.update(error.__dict__)
        exc.args = error.args
        exc.error = error
        return exc

    def __reduce__(self) -> tuple[Any, ...]:
        state = {k: None if k in self._unpicklable else v for k, v in self.__dict__.items()}
        return (_rebuild, (type(self), self.args, state))
