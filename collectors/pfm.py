"""Symbolic, CPU-specific event names (``MEM_LOAD_RETIRED.L3_MISS``) through libpfm4 over ctypes.

libpfm4 (Debian package ``libpfm4``, ``libpfm.so.4``) knows every PMU's event tables; we use
only ``pfm_initialize`` and ``pfm_get_os_event_encoding(..., PFM_OS_PERF_EVENT_EXT, ...)`` to
turn a name into perf_event_attr type/config words. The exclude_* bits libpfm would set
(it excludes guest execution by default) are deliberately not taken over: collectors.perf
decides those for every event alike.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from collectors.perf_abi import PERF_ATTR_SIZE, EventSpec, PerfEventAttr

LIBRARY = "libpfm.so.4"

PFM_SUCCESS = 0
PFM_OS_PERF_EVENT_EXT = 2
PFM_PLM0 = 0x01  # kernel
PFM_PLM3 = 0x08  # user


class PfmUnavailableError(Exception):
    """libpfm4 is not installed or would not initialise; the message says which."""


class PfmEncodeError(Exception):
    """libpfm4 could not encode an event name (unknown here, bad modifier...)."""


class _EncodeArg(ctypes.Structure):
    """``pfm_perf_encode_arg_t`` (perfmon/pfmlib_perf_event.h)."""

    _fields_ = (
        ("attr", ctypes.POINTER(PerfEventAttr)),
        ("fstr", ctypes.POINTER(ctypes.c_char_p)),
        ("size", ctypes.c_size_t),
        ("idx", ctypes.c_int),
        ("cpu", ctypes.c_int),
        ("flags", ctypes.c_int),
        ("pad0", ctypes.c_int),
    )


class Libpfm:
    """A loaded, initialised libpfm4."""

    def __init__(self, library: str = LIBRARY) -> None:
        try:
            self._lib = ctypes.CDLL(library)
        except OSError as exc:
            raise PfmUnavailableError(
                f"libpfm4 ({library}) is not installed: apt-get install libpfm4 ({exc})"
            ) from None
        self._lib.pfm_strerror.restype = ctypes.c_char_p
        self._lib.pfm_strerror.argtypes = (ctypes.c_int,)
        self._lib.pfm_get_os_event_encoding.restype = ctypes.c_int
        self._lib.pfm_get_os_event_encoding.argtypes = (
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
        )
        rc = int(self._lib.pfm_initialize())
        if rc != PFM_SUCCESS:
            raise PfmUnavailableError(f"libpfm4: pfm_initialize failed: {self.strerror(rc)}")

    def strerror(self, code: int) -> str:
        msg: bytes | None = self._lib.pfm_strerror(code)
        return msg.decode(errors="replace") if msg else f"libpfm error {code}"

    def encode(self, name: str) -> EventSpec:
        """perf_event_attr type/config words for a libpfm4 event string."""
        attr = PerfEventAttr()
        attr.size = PERF_ATTR_SIZE
        arg = _EncodeArg()
        arg.attr = ctypes.pointer(attr)
        arg.size = ctypes.sizeof(_EncodeArg)
        rc = int(
            self._lib.pfm_get_os_event_encoding(
                name.encode(), PFM_PLM0 | PFM_PLM3, PFM_OS_PERF_EVENT_EXT, ctypes.byref(arg)
            )
        )
        if rc != PFM_SUCCESS:
            raise PfmEncodeError(f"libpfm4 cannot encode {name!r}: {self.strerror(rc)}")
        return EventSpec(name, int(attr.type), int(attr.config), int(attr.config1), int(attr.config2))


@functools.cache
def load() -> Libpfm:
    """The process-wide libpfm4, loaded once; raises PfmUnavailableError where it is missing."""
    found = ctypes.util.find_library("pfm")
    return Libpfm(found if found and found.startswith("libpfm.so.4") else LIBRARY)
