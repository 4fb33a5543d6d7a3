"""Folders the relay may trust: its socket folder and the folders it loads compiled code from.

Why: whoever can write to a folder can replace what is in it. A socket in a
folder another user owns can be swapped for theirs (clients would talk to
them); a module in a folder another user can write is code they run as the
relay. So, as tmux and ssh-agent do, the relay looks at the folder itself
(``os.lstat``: a symbolic link is refused, not followed) and refuses to start
unless it belongs to the relay's user or root and nobody else can write to it,
except the group of a socket folder the relay made 0770 itself.

Only metadata is read; nothing is created or changed here.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path


class UntrustedFolder(RuntimeError):
    """A folder the relay would use can be written by someone else; the message names it and says what to do."""


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_folder(folder: Path, what: str, *, group_may_write: bool = False) -> None:
    """Raise ``UntrustedFolder`` unless ``folder`` is a real folder of this user or root that no one else can write.

    ``what`` names its use in the message ("socket folder", "kernel cache
    folder"). ``group_may_write`` allows group write when the folder's group
    is one of this process's groups (the socket folder's 0770).
    """
    try:
        info = os.lstat(folder)
    except OSError as error:
        raise UntrustedFolder(f"cannot check the {what} {folder}: {error.strerror}") from error
    me = os.geteuid()
    mode = stat.S_IMODE(info.st_mode)
    shown = f"owner {_owner(info.st_uid)}, mode {mode:04o}"
    if not stat.S_ISDIR(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a folder"
        raise UntrustedFolder(f"the {what} {folder} is {kind} ({shown}); remove it or choose another folder")
    if info.st_uid not in (me, 0):
        raise UntrustedFolder(
            f"the {what} {folder} belongs to another user ({shown}); the relay runs as {_owner(me)}. "
            f"Remove it (it is not yours) or choose a folder of your own"
        )
    own_groups = {os.getegid(), *os.getgroups()}
    writers = []
    if mode & stat.S_IWOTH:
        writers.append("others")
    if mode & stat.S_IWGRP and not (group_may_write and info.st_gid in own_groups):
        writers.append("its group")
    if writers:
        allowed = 0o770 if group_may_write else 0o755
        raise UntrustedFolder(
            f"the {what} {folder} is writable by {' and '.join(writers)} ({shown}); "
            f"run `chmod {allowed:o} {folder}` or choose a folder of your own"
        )
