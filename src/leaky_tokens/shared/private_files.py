"""What the services keep on disk is readable by their own user only: the data directory 0700,
every database file (SQLite's WAL and shared-memory files too) and key file 0600.

SQLite creates a database's -wal and -shm files with the database file's own mode, so making the
database file 0600 before SQLite first opens it is enough for the other two; files left by an
older version with wider modes are narrowed when a service starts.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("leaky_tokens.files")

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def private_directory(path: Path) -> None:
    """Create `path` (and missing parents) as 0700, or narrow an existing one of ours to 0700.

    A directory whose sticky bit is set (/tmp and the like) is shared by design and left alone."""
    if not path.exists():
        path.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        os.chmod(path, DIRECTORY_MODE)  # mkdir's mode is filtered by the umask; be exact
        return
    info = path.stat()
    if info.st_mode & stat.S_ISVTX or info.st_uid != os.getuid():
        return
    if stat.S_IMODE(info.st_mode) != DIRECTORY_MODE:
        log.warning("data directory %s was mode %o; narrowing to 0700", path, info.st_mode & 0o777)
        os.chmod(path, DIRECTORY_MODE)


def private_file(path: Path) -> None:
    """Create `path` empty as 0600 when missing, else narrow it to 0600."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        if stat.S_IMODE(path.stat().st_mode) != FILE_MODE:
            os.chmod(path, FILE_MODE)
    else:
        os.close(fd)


def private_sqlite_file(database: str | Path) -> None:
    """Before SQLite opens `database`: its directory exists, it and its companions are 0600."""
    path = Path(database)
    if not path.parent.exists():
        private_directory(path.parent)
    private_file(path)
    for suffix in SQLITE_COMPANIONS:
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            private_file(companion)
