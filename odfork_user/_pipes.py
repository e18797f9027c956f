"""Moving bytes between a forked child and its parent over a pipe."""
import os


def write_all(fd, data):
    """Write every byte of `data` to `fd` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_to_eof(fd):
    """Read `fd` until the writer closes it; returns the bytes.  Does not close fd."""
    chunks = []
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            return b"".join(chunks)
        chunks.append(b)
