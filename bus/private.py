"""Directories only their owner may use: the key directory and the runtime directory.

One check for both: created with mode 0700 when missing (and set to 0700, whatever the umask
took away), then refused when it is not a directory, belongs to another user, or its group or
others can write to it (they could replace a key or a socket in it). Where a directory sits in a
shared place such as ``/tmp``, a symbolic link is a trap someone else set, and is refused too.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["private_dir"]


def private_dir(path: Path, *, what: str, error: type[Exception], remedy: str, follow_links: bool = True) -> Path:
    """``path``, created with mode 0700 when missing, checked to be a directory only we can write.

    Args:
        what: how messages name it ("key directory").
        error: the exception to raise, with a message naming ``what``, ``path`` and the fault.
        remedy: what to do instead, ending a refusal ("set DPIPES_KEY_DIR to another path").
        follow_links: False to refuse a symbolic link (a directory in a shared place).

    Raises:
        error: it cannot be created, is a link (without ``follow_links``), is not a directory,
            is another user's, or others can write to it.
    """
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as e:
        raise error(f"{what} {path}: cannot create it: {e.strerror or e}") from None
    else:
        path.chmod(0o700)
    try:
        st = path.stat() if follow_links else path.lstat()
    except OSError as e:
        raise error(f"{what} {path}: {e.strerror or e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise error(f"{what} {path} is a symbolic link; refusing to use it: remove it or {remedy}")
    if not stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {path} is not a directory; {remedy}")
    if st.st_uid != os.getuid():
        raise error(
            f"{what} {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); refusing to use it: {remedy}"
        )
    if st.st_mode & 0o022:
        raise error(
            f"{what} {path} is writable by its group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"refusing to use it: run 'chmod 700 {path}' or {remedy}"
        )
    return path
