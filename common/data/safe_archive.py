"""Extract tar archives that come from elsewhere (the hub, a user's download) without trusting them.

A tar member can name any path: `../../home/x/.bashrc`, `/etc/cron.d/job`, a symlink to `/` followed
by a file "inside" it, or a device node. `safe_extract_tar` refuses the whole archive before writing
anything when one member is unsafe, and additionally extracts with tarfile's "data" filter, which
re-checks each member against the files already on disk (it catches link chains that only escape once
earlier members exist).
"""

from __future__ import annotations

import os
import posixpath
import tarfile
from pathlib import Path


def _escapes(path: str) -> bool:
    """Whether a relative POSIX path leaves the directory it is relative to, read lexically."""
    normal = posixpath.normpath(path)
    return normal == ".." or normal.startswith("../")


def _is_absolute(name: str) -> bool:
    # Windows forms too: an archive built on Windows may carry drive letters or backslashes.
    return name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":")


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why extracting `member` would be unsafe, or None when it is a plain file or folder inside dest."""
    name = member.name
    if _is_absolute(name):
        return "has an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "contains '..'"
    if member.isdev():
        return "is a device file or FIFO"
    if member.issym():
        target = member.linkname
        if _is_absolute(target):
            return f"is a symlink to the absolute path {target!r}"
        if _escapes(posixpath.join(posixpath.dirname(name), target)):
            return f"is a symlink pointing outside the destination ({target!r})"
    elif member.islnk():
        # Hard link targets are archive member names, relative to the archive root.
        target = member.linkname
        if _is_absolute(target) or _escapes(target):
            return f"is a hard link pointing outside the destination ({target!r})"
    elif not (member.isfile() or member.isdir()):
        return f"has an unsupported member type {member.type!r}"
    return None


def safe_extract_tar(archive: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Extract the tar archive `archive` (any compression tarfile reads) into `dest`, created if missing.

    Raises ValueError naming the archive and the first offending member when any member has an
    absolute path, a `..` component, is a device file, or is a link pointing outside `dest`; in that case
    nothing is extracted. Returns the names of the extracted members.
    """
    archive = Path(archive)
    dest = Path(dest)
    try:
        tar = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError) as error:
        raise ValueError(f"{archive}: cannot read it as a tar archive ({error}); is the file complete?") from error
    with tar:
        members = tar.getmembers()
        for member in members:
            problem = _member_problem(member)
            if problem is not None:
                raise ValueError(
                    f"{archive}: refusing to extract member {member.name!r}: it {problem}. "
                    "The archive is unsafe or corrupt; nothing was extracted."
                )
        dest.mkdir(parents=True, exist_ok=True)
        if hasattr(tarfile, "data_filter"):
            try:
                tar.extractall(dest, members=members, filter="data")
            except tarfile.FilterError as error:
                raise ValueError(
                    f"{archive}: refusing to extract member {error.tarinfo.name!r}: {error}. "
                    f"Files extracted before it are in {dest}; delete them."
                ) from error
        else:
            # Python without the data filter (older than 3.11.4) cannot re-check links against the disk
            # while extracting, so links are refused altogether there.
            for member in members:
                if member.issym() or member.islnk():
                    raise ValueError(
                        f"{archive}: refusing to extract the link {member.name!r}: this Python has no "
                        "tarfile data filter to check links safely; upgrade to Python >= 3.11.4"
                    )
            tar.extractall(dest, members=members)
    return [member.name for member in members]
