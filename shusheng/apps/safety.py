"""What makes the app safe to share on a network: who may connect, which folders it may read and where it
writes, which uploads it decodes, and how much work one request may take.

* **Access** (:func:`resolve_auth`, :func:`check_exposure`): serving beyond loopback needs a password
  (``--auth USER:PASSWORD``, ``--auth-file FILE`` or ``$SHUSHENG_DEMO_AUTH``), unless ``--insecure-no-auth``
  says the network is trusted.
* **Folders** (:class:`FolderPolicy`): the app indexes and searches only below its allowed folders (``..`` and
  symbolic links that lead out are refused before anything is looked at or written). Video frames shown for
  search hits are read only from videos that lie in the index's own collection as well (:func:`within`). An index goes into
  ``FOLDER/.shusheng-index`` only for folders the app generated, folders that already hold one, or when asked
  (``index_in_folder``); any other folder, read-only or foreign ones included, is indexed under ``index_root``
  (default ``$SHUSHENG_CACHE_DIR/indexes``).
* **Uploads** (:func:`load_upload`): the file size is checked before anything is read and the pixel count
  before anything is decoded (:func:`shusheng.data.load_image`); decompression bombs, truncated files and
  files that are not images become one message, in every tab.
* **Load** (:class:`AppLimits`): bounded concurrency and queue, a time limit per request.

Stdlib only at import time (``load_upload`` imports the image loader when called).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shusheng._cache import cache_dir
from shusheng.retrieval_index.layout import DEFAULT_INDEX_DIRNAME

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["AUTH_ENV", "AppLimits", "FolderPolicy", "InsecureLaunchError", "UserInputError", "cache_root",
           "check_exposure", "is_loopback", "load_upload", "parse_credentials", "read_auth_file", "resolve_auth",
           "within"]

#: Environment variable holding ``USER:PASSWORD`` for ``shusheng demo`` (used when no ``--auth``/``--auth-file``).
AUTH_ENV = "SHUSHENG_DEMO_AUTH"


class UserInputError(ValueError):
    """Bad input from the user; its message is shown in the app as it is."""


class InsecureLaunchError(ValueError):
    """Serving beyond loopback without a password (and without ``insecure_no_auth``); the message says how to
    give one."""


def cache_root() -> Path:
    """The shusheng cache folder: ``$SHUSHENG_CACHE_DIR``, else ``$XDG_CACHE_HOME/shusheng``, else
    ``~/.cache/shusheng`` (``shusheng._cache``)."""
    return cache_dir()


# ---------------------------------------------------------------------------------------------------- limits
@dataclass(frozen=True)
class AppLimits:
    """How much the app accepts and does at once.

    Attributes:
        max_upload_bytes: largest uploaded file (Gradio's ``max_file_size``, and checked again before reading).
        max_upload_pixels: largest uploaded image, width × height, checked from the header before decoding.
        request_timeout: seconds a search, caption or answer may take before the user gets an error instead.
        index_timeout: seconds one *Index folder* run may take; it then stops, keeps what it indexed, and the
            next run continues.
        concurrency: requests (searches, captions, answers) running at once; indexing runs one at a time besides.
        queue_size: requests waiting at most; more are turned away with "the queue is full".
    """

    max_upload_bytes: int = 20 * 2**20
    max_upload_pixels: int = 40_000_000
    request_timeout: float = 60.0
    index_timeout: float = 600.0
    concurrency: int = 2
    queue_size: int = 64

    def __post_init__(self):
        for name in ("max_upload_bytes", "max_upload_pixels", "concurrency", "queue_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"AppLimits.{name} must be at least 1, not {getattr(self, name)}")
        for name in ("request_timeout", "index_timeout"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"AppLimits.{name} must be positive, not {getattr(self, name)}")


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB" if n < 10 * 2**20 else f"{n / 2**20:.0f} MB"


def load_upload(path: str | os.PathLike, limits: AppLimits | None = None, what: str = "the image") -> Image.Image:
    """Decodes an uploaded image file within ``limits``: the file size is checked before it is read, the pixel
    count (from the header) before it is decoded.

    Args:
        path: the uploaded file (what the app's image inputs hand over: a path, never decoded pixels).
        limits: the upload limits (default :class:`AppLimits`).
        what: how the message names the image (``"the query image"``).

    Returns:
        The RGB image (``shusheng.data.load_image``: EXIF orientation applied).

    Raises:
        UserInputError: ``Cannot use {what}: {reason}.`` (too large a file, too many pixels, a decompression
            bomb, truncated or corrupt data, not an image).
    """
    from shusheng.data import ImageLoadError, load_image

    limits = limits or AppLimits()
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserInputError(f"Cannot use {what}: the upload cannot be read ({e.strerror or e}).") from e
    if not stat.S_ISREG(st.st_mode):
        raise UserInputError(f"Cannot use {what}: the upload is not a file.")
    if st.st_size > limits.max_upload_bytes:
        raise UserInputError(f"Cannot use {what}: the file is {_mb(st.st_size)}; uploads are limited to "
                             f"{_mb(limits.max_upload_bytes)}.")
    try:
        return load_image(path, max_pixels=limits.max_upload_pixels)
    except ImageLoadError as e:  # the app's operator, not its user, sets the limit
        reason = e.reason.replace("exceeds the limit of", "exceeds the app's upload limit of").replace(
            "; raise max_pixels to allow it", "")
        raise UserInputError(f"Cannot use {what}: {reason}.") from e


# ---------------------------------------------------------------------------------------------------- access
def is_loopback(host: str | None) -> bool:
    """Whether serving on ``host`` reaches this machine only (``127.0.0.0/8``, ``::1``, ``localhost``). Any other
    address, ``0.0.0.0``/``::`` and host names (which may resolve to any interface) are not."""
    if host is None:
        return True  # Gradio's default: 127.0.0.1
    host = host.strip()
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_credentials(text: str, source: str = "--auth") -> tuple[str, str]:
    """``"USER:PASSWORD"`` → ``(user, password)`` (split at the first colon; the password may hold colons).

    Raises:
        ValueError: no colon, an empty user or an empty password.
    """
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise ValueError(f"{source} must be USER:PASSWORD with a non-empty user and password")
    return user, password


def read_auth_file(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The ``USER:PASSWORD`` lines of ``path`` (blank lines and ``#`` comments skipped). Warns when the file can
    be read by other users.

    Raises:
        ValueError: the file cannot be read, a line is not ``USER:PASSWORD``, or there is none.
    """
    p = Path(path).expanduser()
    try:
        text = p.read_text()
        mode = p.stat().st_mode
    except OSError as e:
        raise ValueError(f"cannot read --auth-file {os.fspath(p)}: {e.strerror or e}") from e
    if mode & 0o077:
        logger.warning("--auth-file %s can be read by other users (mode %o); chmod 600 it", p, mode & 0o777)
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            pairs.append(parse_credentials(line, f"line {n} of --auth-file {os.fspath(p)}"))
    if not pairs:
        raise ValueError(f"--auth-file {os.fspath(p)} holds no USER:PASSWORD line")
    return pairs


def resolve_auth(auth: Iterable[str] | None = None, auth_file: str | os.PathLike | None = None,
                 environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """The accounts of the app: every ``--auth USER:PASSWORD`` and ``--auth-file`` line; when neither is given,
    ``$SHUSHENG_DEMO_AUTH`` (``USER:PASSWORD``). Empty: no password.

    Raises:
        ValueError: a malformed pair or an unreadable file.
    """
    environ = os.environ if environ is None else environ
    pairs = [parse_credentials(a) for a in (auth or ())]
    if auth_file is not None:
        pairs += read_auth_file(auth_file)
    if not pairs and environ.get(AUTH_ENV):
        pairs.append(parse_credentials(environ[AUTH_ENV], f"${AUTH_ENV}"))
    return pairs


def check_exposure(host: str | None, auth: Sequence[tuple[str, str]] | None, insecure_no_auth: bool = False) -> None:
    """Refuses to serve beyond loopback without a password; warns when ``insecure_no_auth`` allows it.

    Raises:
        InsecureLaunchError: ``host`` is not loopback, no account is given and not ``insecure_no_auth``.
    """
    if is_loopback(host) or auth:
        return
    if insecure_no_auth:
        logger.warning("serving on %s WITHOUT a password (--insecure-no-auth): anyone who can reach this machine "
                       "can search, index and view the allowed folders", host)
        return
    raise InsecureLaunchError(
        f"refusing to serve on {host} without a password: anyone who can reach this machine could search, index "
        f"and view its pictures. Give --auth USER:PASSWORD, --auth-file FILE (lines of USER:PASSWORD) or set "
        f"{AUTH_ENV}=USER:PASSWORD; on a network you trust, --insecure-no-auth serves without one.")


# ---------------------------------------------------------------------------------------------------- folders
def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def within(path: str | os.PathLike, folders: Iterable[str | os.PathLike]) -> bool:
    """Whether ``path`` is one of ``folders`` or lies below one, both resolved (``..`` and symbolic links
    followed). A collection's roots may be files given directly: such a root covers that file only."""
    return _inside(_real(path), [_real(f) for f in folders])


def _can_write(folder: Path) -> bool:
    try:
        return os.access(folder, os.W_OK | os.X_OK) and folder.stat().st_uid == os.getuid()
    except OSError:
        return False


class FolderPolicy:
    """The folders the app may index and search, and where their indexes go.

    Args:
        allow_dirs: the allowed folders; everything below them (after resolving ``..`` and symbolic links)
            is allowed, nothing else. Empty: no folder may be indexed.
        index_root: where indexes of folders the app does not own go (default ``cache_root()/"indexes"``).
        owned: folders the app generated itself (the demo's sample collection): indexed in place.
        index_in_folder: index an allowed folder into ``FOLDER/.shusheng-index`` when the folder is this user's
            and writable (default: only folders that already hold an index, and ``owned`` ones).
    """

    def __init__(self, allow_dirs: Iterable[str | os.PathLike] = (), index_root: str | os.PathLike | None = None,
                 *, owned: Iterable[str | os.PathLike] = (), index_in_folder: bool = False):
        self.allowed: tuple[Path, ...] = tuple(dict.fromkeys(_real(d) for d in allow_dirs))
        self.index_root = Path(index_root).expanduser().absolute() if index_root else cache_root() / "indexes"
        self.owned: tuple[Path, ...] = tuple(dict.fromkeys(_real(d) for d in owned))
        self.index_in_folder = index_in_folder

    def __repr__(self) -> str:
        return (f"FolderPolicy(allowed={[os.fspath(p) for p in self.allowed]}, "
                f"index_root={os.fspath(self.index_root)!r}, index_in_folder={self.index_in_folder})")

    def describe(self) -> str:
        """The allowed folders, for messages."""
        return ", ".join(os.fspath(p) for p in self.allowed) or "none"

    def contains(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` (resolved: ``..`` and symbolic links followed) lies in an allowed folder."""
        return _inside(_real(path), self.allowed)

    def check_folder(self, folder: str | None) -> Path:
        """The folder a user typed, resolved, if the app may index it. The allow-list is checked before the
        folder is looked at, so a refusal says nothing about what exists outside.

        Returns:
            The folder's real path (symbolic links resolved).

        Raises:
            UserInputError: empty, not absolute, outside the allowed folders (directly, through ``..`` or
                through a symbolic link), missing, or not a folder.
        """
        text = (folder or "").strip()
        if not text:
            raise UserInputError("Enter the folder of images to index.")
        if "\x00" in text:
            raise UserInputError("The folder name holds a NUL character.")
        given = Path(text).expanduser()
        if not given.is_absolute():
            raise UserInputError(f"Give the folder as an absolute path on the server (like "
                                 f"{os.fspath(self.allowed[0]) if self.allowed else '/data/photos'}), not {text!r}.")
        if not self.allowed:
            raise UserInputError("This app may not index any folder: start it with --allow-dir DIR "
                                 "(build_demo(allow_dirs=[...])).")
        real = _real(given)
        if not _inside(real, self.allowed):
            lexical = Path(os.path.normpath(given))
            if ".." in given.parts and not _inside(lexical, self.allowed):
                why = "'..' leads outside the folders this app may index"
            elif _inside(lexical, [Path(os.path.normpath(a)) for a in self.allowed]) or _inside(
                    _real(lexical.parent), self.allowed):
                why = "a symbolic link leads outside the folders this app may index"
            else:
                why = "it is outside the folders this app may index"
            raise UserInputError(f"Refused {text}: {why} ({self.describe()}). Nothing was indexed; start the app "
                                 f"with --allow-dir to allow another folder.")
        if not real.exists():
            raise UserInputError(f"Folder {os.fspath(given)} does not exist.")
        if not real.is_dir():
            raise UserInputError(f"{os.fspath(given)} is not a folder.")
        return real

    def index_path_for(self, folder: str | os.PathLike) -> Path:
        """Where the index of ``folder`` (a real path, as :meth:`check_folder` returns) lives:
        ``FOLDER/.shusheng-index`` for folders the app owns, folders that already hold a writable index, and
        (with ``index_in_folder``) the user's own writable folders; else ``index_root/<name>-<hash of the path>``.
        """
        root = Path(folder)
        in_folder = root / DEFAULT_INDEX_DIRNAME
        if (_inside(_real(root), self.owned) and _can_write(root)) or \
                ((in_folder / "embedder.json").is_file() and _can_write(in_folder)) or \
                (self.index_in_folder and _can_write(root)):
            return in_folder
        digest = hashlib.sha256(os.fsencode(os.fspath(root))).hexdigest()[:16]
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in root.name)[:40] or "root"
        return self.index_root / f"{name}-{digest}"
