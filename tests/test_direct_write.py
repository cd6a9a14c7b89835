"""Checkpoints and models are written around the page cache (core.direct_write), byte for byte what torch.save
writes, falling back to buffered writes where the file system refuses O_DIRECT."""

from __future__ import annotations

import ctypes
import errno
import io
import mmap
import os

import pytest
import torch

from clinicadl_app.core import direct_write
from clinicadl_app.core.atomic import save_torch


def _payload(floats: int) -> dict:
    generator = torch.Generator().manual_seed(floats)
    return {"model": {"weight": torch.randn(floats, generator=generator), "bias": torch.randn(3, generator=generator)},
            "epoch": 2}


def _torch_bytes(payload) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _cached_pages(path) -> tuple[int, int]:
    """Pages of the file in the page cache (mincore over a mapping of it), and pages in all."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as stream:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, stream.fileno(), 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(address, size)
    return sum(v & 1 for v in vector), pages


@pytest.mark.parametrize("floats", [10, 4 * 2**20 - 200, 10 * 2**20 + 123])
def test_a_direct_save_is_byte_for_byte_torch_save_and_leaves_the_page_cache_alone(tmp_path, floats):
    """Sizes below one block, just around one 16 MB block with its headers, and over two blocks with a tail."""
    payload = _payload(floats)
    path = tmp_path / "model.pth.tar"
    save_torch(payload, path, direct=True)
    if floats > 2**20:  # before anything reads the file; at most the buffered tail's pages
        cached, pages = _cached_pages(path)
        assert cached <= 2, f"{cached} of {pages} pages went through the page cache"
    assert path.read_bytes() == _torch_bytes(payload)
    loaded = torch.load(path, weights_only=True)
    assert all(torch.equal(loaded["model"][k], v) for k, v in payload["model"].items())
    buffered = tmp_path / "buffered.pth.tar"
    save_torch(payload, buffered)
    cached, pages = _cached_pages(buffered)
    assert cached > 0.9 * pages, "the check sees cached pages"


def test_this_machines_temporary_folder_takes_direct_writes(tmp_path):
    """Where the tests and the CI run: a fallback here would leave the fast path untested."""
    with direct_write.DirectFile(tmp_path / "probe") as probe:
        assert probe.direct


@pytest.mark.parametrize("refused", ["open", "write"])
def test_a_file_system_without_direct_writes_gets_the_same_bytes_buffered(tmp_path, monkeypatch, refused):
    """EINVAL at open (no O_DIRECT there) or at a write (an alignment the device does not take)."""
    real_open, real_write = os.open, os.write

    def refusing_open(path, flags, *args):
        if refused == "open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def refusing_write(fd, data):
        if refused == "write" and direct_write.fcntl.fcntl(fd, direct_write.fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct_write.os, "open", refusing_open)
    monkeypatch.setattr(direct_write.os, "write", refusing_write)
    payload = _payload(5 * 2**20)
    path = tmp_path / "checkpoint.pth.tar"
    save_torch(payload, path, direct=True)
    assert path.read_bytes() == _torch_bytes(payload)
