"""Files written whole or not at all: a crash mid-write leaves the old version, never half of a new one."""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, mode: int | None = None, group: int | None = None) -> None:
    """Write a temporary sibling, then rename it over `path`; `mode` (e.g. 0o600 for secrets) is set before the
    contents are written, so a secret is never readable by others even briefly; `group` (a gid) owns it before the
    rename (a broker that runs as another user reads it through its group)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if mode is None else mode)
    if group is not None:
        os.fchown(fd, -1, group)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        os.chmod(tmp, mode)             # os.open's mode is filtered by the umask
    os.replace(tmp, path)
