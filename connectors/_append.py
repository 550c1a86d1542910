"""Append whole lines to an open unbuffered file, or nothing: shared by the file-writing sinks."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)


def append_whole_lines(fh: BinaryIO, path: Path, data: bytes, fsync: bool, sink: str) -> bool:
    """Write ``data`` at the end of ``fh`` (opened ``ab``, unbuffered), fsync if asked; True on success.

    A write that fails part-way is cut off again (truncate to the old size), so a retry appends whole
    lines only: no torn line, no line written twice. Devices such as /dev/stdout cannot be truncated
    and are left as they are.
    """
    try:
        start = fh.seek(0, os.SEEK_END) if path.is_file() else None
    except OSError:
        start = None
    try:
        view = memoryview(data)
        while view:
            view = view[fh.write(view):]
        if fsync:
            os.fsync(fh.fileno())
    except OSError as error:
        if start is not None:
            try:
                fh.truncate(start)
            except OSError as cut:
                log.error("sink %s: %s may end in a partial line (truncate failed: %s)", sink, path, cut)
        log.warning("sink %s: cannot append to %s: %s", sink, path, error)
        return False
    return True
