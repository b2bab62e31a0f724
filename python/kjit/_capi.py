"""ctypes declarations of kjit's C ABI (include/kjit/kjit.h) and the library lookup."""
import ctypes
import os
import pathlib

KJIT_OK = 0
STATUS_NAMES = {
    1: "spec", 2: "template", 3: "compile", 4: "cache", 5: "cuda", 6: "unavailable", 7: "argument", 8: "internal",
}

ARG_POINTER, ARG_TENSOR, ARG_INT, ARG_FLOAT = 0, 1, 2, 3


class _ArgValue(ctypes.Union):
    _fields_ = [("pointer", ctypes.c_void_p), ("tensor", ctypes.c_void_p),
                ("integer", ctypes.c_int64), ("real", ctypes.c_double)]


class Arg(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("value", _ArgValue)]


def _candidates():
    env = os.environ.get("KJIT_LIBRARY")
    if env:
        yield env
    here = pathlib.Path(__file__).resolve()
    for up in here.parents:  # a source checkout: <repo>/build/libkjit.so
        yield str(up / "build" / "libkjit.so")
        if (up / "CMakeLists.txt").exists():
            break
    yield "libkjit.so"


def load_library():
    errors = []
    for path in _candidates():
        if os.sep in path and not os.path.exists(path):
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
            continue
        _declare(lib)
        return lib, path
    raise OSError("libkjit.so not found (set KJIT_LIBRARY, or build it with tools/run-tests): " + "; ".join(errors))


def _declare(lib):
    P = ctypes.POINTER
    lib.kjit_engine_create.argtypes = [ctypes.c_char_p, P(ctypes.c_void_p)]
    lib.kjit_engine_create.restype = ctypes.c_int
    lib.kjit_engine_destroy.argtypes = [ctypes.c_void_p]
    lib.kjit_engine_destroy.restype = None
    lib.kjit_get.argtypes = [ctypes.c_void_p, ctypes.c_char_p, P(ctypes.c_void_p)]
    lib.kjit_get.restype = ctypes.c_int
    lib.kjit_kernel_release.argtypes = [ctypes.c_void_p]
    lib.kjit_kernel_release.restype = None
    lib.kjit_launch.argtypes = [ctypes.c_void_p, P(Arg), ctypes.c_size_t, ctypes.c_void_p]
    lib.kjit_launch.restype = ctypes.c_int
    lib.kjit_kernel_info.argtypes = [ctypes.c_void_p]
    lib.kjit_kernel_info.restype = ctypes.c_char_p
    lib.kjit_render.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, P(ctypes.c_size_t)]
    lib.kjit_render.restype = ctypes.c_int
    lib.kjit_last_error.argtypes = []
    lib.kjit_last_error.restype = ctypes.c_char_p
    lib.kjit_version.argtypes = []
    lib.kjit_version.restype = ctypes.c_char_p


# DLPack: a "dltensor" capsule holds a DLManagedTensor*, whose first member is the DLTensor.
_capsule_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_get_pointer.restype = ctypes.c_void_p
_capsule_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def dltensor_address(capsule):
    return _capsule_get_pointer(capsule, b"dltensor")
