"""Which file system a folder is on, to warn when the decode-once cache would be read over the network.

Every trial reads its whole training split from the cache each epoch (memory-mapped, random batches): on a
local disk that is page-cache speed, on NFS every miss is a network round trip shared by all trials of all
nodes reading the same server — a `$HOME` on NFS is the usual way to get there by default.
"""
from __future__ import annotations

import os
from pathlib import Path

MOUNTS_FILE = "/proc/self/mounts"
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
    "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "fuse.glusterfs", "fuse.cephfs", "wekafs",
})


def _unescape(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash in paths as octal escapes
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def filesystem_type(path: str | os.PathLike, mounts: str | None = None) -> str | None:
    """The type of the file system that holds (or would hold) `path`: the deepest mount point above it in
    /proc/self/mounts (or the given text in that format); None where that is unknown (not Linux)."""
    if mounts is None:
        try:
            mounts = Path(MOUNTS_FILE).read_text()
        except OSError:
            return None
    folder = Path(os.path.realpath(os.fspath(path)))     # symlinks resolved; the folder need not exist yet
    best, best_type = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point, kind = _unescape(fields[1]), fields[2]
        inside = folder == Path(point) or Path(point) in folder.parents
        if inside and len(point) >= len(best):    # the deepest mount point wins; later lines overmount earlier
            best, best_type = point, kind
    return best_type


def network_filesystem(path: str | os.PathLike, mounts: str | None = None) -> str | None:
    """The file-system type when `path` is on a network file system (nfs, cifs, lustre, ...), else None."""
    kind = filesystem_type(path, mounts)
    return kind if kind in NETWORK_FILESYSTEMS else None
