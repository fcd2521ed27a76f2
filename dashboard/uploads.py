"""Uploaded files and code the user trusts: where uploads go, and what the dashboard may load.

Uploads go to a private folder: `~/.quantlens/uploads` (or QUANTLENS_UPLOAD_DIR), created mode 0700
and refused when it exists but is a link, not the user's, or open to others: in a shared folder
such as /tmp another local user could create it first and plant files in it. Each upload is written
fresh (a new file, then renamed over the final name, so whatever sat there is replaced, never
reused) and its sha256 is recorded in this process; a file in the upload folder is used only when
this process wrote it and its content still has that hash.

Loading a `.pt2` program or a `file.py:function` runs Python code. The dashboard loads one only
when the user named it in this browser session with "I trust this code" (`TrustedCode`), and only
while its file still has the hash it had then. No Streamlit here: `dashboard.state` keeps a session's
`TrustedCode` in the session state.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
import uuid
from pathlib import Path

from dashboard.settings import upload_dir

_WRITTEN: dict[Path, str] = {}  # uploads this process wrote -> sha256 of what it wrote
_LOCK = threading.Lock()


class UploadError(ValueError):
    """An upload folder or file the dashboard will not use (one line: what is wrong, how to fix it)."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def private_dir(path: Path) -> Path:
    """`path` as a folder only this user can enter: created 0700 when missing (its parents as usual),
    else checked to be a real folder (not a link) owned by this user with no access for others."""
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    fix = "remove it or set QUANTLENS_UPLOAD_DIR to a folder only you can open"
    if not stat.S_ISDIR(info.st_mode):
        raise UploadError(f"upload folder {path} is not a folder (a link or a file); {fix}")
    if info.st_uid != os.getuid():
        raise UploadError(f"upload folder {path} belongs to user id {info.st_uid}, not you ({os.getuid()}); {fix}")
    if info.st_mode & 0o077:
        raise UploadError(f"upload folder {path} is open to other users (mode {stat.S_IMODE(info.st_mode):o}); {fix}")
    return path


def upload_root() -> Path:
    return private_dir(upload_dir())


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", Path(name).name).lstrip(".") or "upload"


def save(name: str, data: bytes) -> Path:
    """Write an uploaded file to `<upload folder>/<sha256[:16]>/<name>` and record its hash.

    Always writes: a file already at that path (a planted one, a link, a leftover) is replaced
    by a rename, never kept in place of the upload."""
    digest = hashlib.sha256(data).hexdigest()
    folder = private_dir(upload_root() / digest[:16])
    path = folder / safe_name(name)
    tmp = folder / f".{path.name}.{uuid.uuid4().hex}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with _LOCK:
        _WRITTEN[path] = digest
    return path


def is_upload(path: Path) -> bool:
    """Whether `path` lies in the upload folder (wherever QUANTLENS_UPLOAD_DIR points now)."""
    root = Path(upload_dir()).expanduser().absolute()
    return Path(path).expanduser().absolute().is_relative_to(root)


def verify(path: str | Path) -> None:
    """Refuse a file in the upload folder unless this process wrote it and it still has that content."""
    path = Path(path).expanduser().absolute()
    if not is_upload(path):
        return
    with _LOCK:
        expected = _WRITTEN.get(path)
    if expected is None:
        raise UploadError(f"{path.name} was not uploaded to this dashboard process (it predates a restart, "
                          "or someone else put it there); upload it again")
    if not path.is_file() or sha256_of(path) != expected:
        raise UploadError(f"{path.name} changed after it was uploaded; upload it again")


def code_file(spec: str | None) -> Path | None:
    """The file whose Python code runs when `spec` is loaded: the `.py` of a `file.py:function`, or a
    `.pt2` program; None for samples and data or weight files."""
    if not spec or spec.startswith("sample:"):
        return None
    head, sep, _ = spec.rpartition(":")
    if sep and head.lower().endswith(".py"):
        return Path(head).expanduser().absolute()
    if spec.lower().endswith(".pt2"):
        return Path(spec).expanduser().absolute()
    return None


class TrustedCode:
    """The code files one browser session named with "I trust this code", each with its hash then."""

    def __init__(self) -> None:
        self._files: dict[Path, str] = {}

    def trust(self, spec: str) -> None:
        path = code_file(spec)
        if path is None or not path.is_file():  # nothing to run: the loader says the file is missing
            return
        verify(path)
        self._files[path] = sha256_of(path)

    def check(self, spec: str | None) -> None:
        """Refuse `spec` when it runs code this session did not trust, or that changed since."""
        path = code_file(spec)
        if path is None or not path.is_file():  # nothing to run: the loader says the file is missing
            return
        expected = self._files.get(path)
        if expected is None:
            raise UploadError(f"{spec} runs Python code and was not named in this session: tick "
                              "'I trust this code' for it (Model & data page, or Manage this run) if you do")
        verify(path)
        if sha256_of(path) != expected:
            raise UploadError(f"{path.name} changed since you trusted it; tick 'I trust this code' again if you still do")

    def __contains__(self, spec: str) -> bool:
        try:
            self.check(spec)
        except UploadError:
            return False
        return True
