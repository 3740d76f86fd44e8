"""The CUDA driver's virtual memory API through ctypes on libcuda (no extra package).

Only what the pool needs: reserve a virtual range once, create / map / unmap /
release physical chunks inside it. Every call's result is checked and turned
into a `CudaDriverError` naming the call and the driver's message.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0


class CudaDriverError(RuntimeError):
    """A CUDA driver call failed."""


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class _AllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _AllocFlags),
    ]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


@lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as err:
        raise CudaDriverError(f"cannot load the CUDA driver library libcuda.so.1: {err}") from err
    _check(lib, "cuInit", lib.cuInit(0))
    return lib


def _check(lib: ctypes.CDLL, call: str, result: int) -> None:
    if result != 0:
        message = ctypes.c_char_p()
        lib.cuGetErrorString(result, ctypes.byref(message))
        text = message.value.decode() if message.value else "unknown error"
        raise CudaDriverError(f"{call} failed with CUDA error {result}: {text}")


def _prop(device: int) -> _AllocationProp:
    prop = _AllocationProp()
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location = _Location(CU_MEM_LOCATION_TYPE_DEVICE, device)
    return prop


def granularity(device: int) -> int:
    """Smallest size and alignment of a physical chunk on `device`."""
    lib, value = _lib(), ctypes.c_size_t()
    prop = _prop(device)
    _check(lib, "cuMemGetAllocationGranularity",
           lib.cuMemGetAllocationGranularity(ctypes.byref(value), ctypes.byref(prop), CU_MEM_ALLOC_GRANULARITY_MINIMUM))
    return value.value


def reserve(size: int, alignment: int) -> int:
    """Reserve `size` bytes of virtual addresses; returns the base address."""
    lib, ptr = _lib(), ctypes.c_ulonglong()
    _check(lib, "cuMemAddressReserve",
           lib.cuMemAddressReserve(ctypes.byref(ptr), ctypes.c_size_t(size), ctypes.c_size_t(alignment),
                                   ctypes.c_ulonglong(0), ctypes.c_ulonglong(0)))
    return ptr.value


def free_reservation(ptr: int, size: int) -> None:
    lib = _lib()
    _check(lib, "cuMemAddressFree", lib.cuMemAddressFree(ctypes.c_ulonglong(ptr), ctypes.c_size_t(size)))


def create_and_map(ptr: int, size: int, device: int) -> int:
    """Back [ptr, ptr + size) with new physical memory on `device`, read-write; returns the handle."""
    lib, handle = _lib(), ctypes.c_ulonglong()
    prop = _prop(device)
    _check(lib, "cuMemCreate", lib.cuMemCreate(ctypes.byref(handle), ctypes.c_size_t(size), ctypes.byref(prop),
                                                ctypes.c_ulonglong(0)))
    try:
        _check(lib, "cuMemMap", lib.cuMemMap(ctypes.c_ulonglong(ptr), ctypes.c_size_t(size), ctypes.c_size_t(0),
                                             handle, ctypes.c_ulonglong(0)))
    except CudaDriverError:
        lib.cuMemRelease(handle)
        raise
    access = _AccessDesc(_Location(CU_MEM_LOCATION_TYPE_DEVICE, device), CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
    try:
        _check(lib, "cuMemSetAccess", lib.cuMemSetAccess(ctypes.c_ulonglong(ptr), ctypes.c_size_t(size),
                                                         ctypes.byref(access), ctypes.c_size_t(1)))
    except CudaDriverError:
        unmap_and_release(ptr, size, handle.value)
        raise
    return handle.value


def unmap_and_release(ptr: int, size: int, handle: int) -> None:
    """Unmap [ptr, ptr + size) and give its physical memory back to the device."""
    lib = _lib()
    _check(lib, "cuMemUnmap", lib.cuMemUnmap(ctypes.c_ulonglong(ptr), ctypes.c_size_t(size)))
    _check(lib, "cuMemRelease", lib.cuMemRelease(ctypes.c_ulonglong(handle)))
