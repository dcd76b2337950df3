"""CurveZMQ key pairs on disk, their fingerprints, and where they live.

Keys are pyzmq certificate files, written by :func:`zmq.auth.create_certificates` and read by
:func:`zmq.auth.load_certificate` (the ZeroMQ/czmq format; nothing here writes key material by
hand). A key pair ``NAME`` is two files in the key directory:

``NAME.key_secret``
    the secret certificate (public and secret key), mode 0600. A file that its group or others
    can read or write, or that belongs to another user, is refused, as ssh refuses an unprotected
    private key.
``NAME.key``
    the public certificate, mode 0644: safe to hand to anyone.

Two pairs are made on first use: ``node`` (a daemon's, when it first starts) and ``client`` (a
user's, when ``dpipes`` first needs it). Both live in the *key directory*:
``$DPIPES_KEY_DIR`` if set (tests, or a packager's ``/etc/dpipes``), else
``$XDG_CONFIG_HOME/dpipes`` (``~/.config/dpipes`` when ``XDG_CONFIG_HOME`` is unset, empty or
relative), created with mode 0700 and refused if another user owns it or others can write to it.

A public key is 32 bytes, written as 40 characters of Z85 (the ZeroMQ text form). Its
*fingerprint* is ``SHA256:`` and the unpadded base64 of the SHA-256 of those 32 bytes, as ssh
shows keys (``ssh-keygen -l``): short enough to read over the phone, and what ``dpipes keys`` prints,
what a known-nodes pin holds, and what a node logs as the identity of a caller.

A new pair is created in a private temporary directory and then hard-linked into place, so a
secret file is never visible with a wider mode, and two processes creating the same pair at once
end with one pair, which both then load.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from dpipes.bus.errors import KeyFileError
from dpipes.bus.private import private_dir

__all__ = [
    "CLIENT_KEY",
    "KEY_DIR_ENV",
    "NODE_KEY",
    "KeyPair",
    "PublicKey",
    "ensure_key_dir",
    "fingerprint",
    "key_dir",
    "load_keypair",
    "load_or_create_keypair",
    "load_public_key",
]

log = logging.getLogger(__name__)

KEY_DIR_ENV = "DPIPES_KEY_DIR"
NODE_KEY = "node"
CLIENT_KEY = "client"
Z85_KEY_CHARS = 40  # 32 bytes in Z85
RAW_KEY_BYTES = 32
FINGERPRINT_PREFIX = "SHA256:"


def fingerprint(raw_public_key: bytes) -> str:
    """``SHA256:<unpadded base64 of sha256(key)>``, as ssh prints key fingerprints."""
    digest = hashlib.sha256(raw_public_key).digest()
    return FINGERPRINT_PREFIX + base64.b64encode(digest).decode("ascii").rstrip("=")


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A CURVE public key; ``str()`` gives its 40-character Z85 text."""

    z85: str

    @classmethod
    def parse(cls, text: str | bytes) -> PublicKey:
        """A key from its Z85 text.

        Raises:
            ValueError: not 40 characters of Z85, with what is wrong.
        """
        if isinstance(text, bytes):
            text = text.decode("ascii", errors="replace")
        text = text.strip()
        if len(text) != Z85_KEY_CHARS:
            raise ValueError(f"a public key is {Z85_KEY_CHARS} characters of Z85, got {len(text)}")
        try:
            raw = z85.decode(text.encode("ascii"))
        except (ValueError, KeyError, UnicodeEncodeError, binascii.Error):
            raise ValueError(f"{text!r} is not Z85 text") from None
        if len(raw) != RAW_KEY_BYTES or z85.encode(raw).decode("ascii") != text:
            raise ValueError(f"{text!r} is not Z85 text")
        return cls(text)

    @classmethod
    def from_raw(cls, raw: bytes) -> PublicKey:
        """A key from its 32 bytes (as ZAP hands it over)."""
        if len(raw) != RAW_KEY_BYTES:
            raise ValueError(f"a public key is {RAW_KEY_BYTES} bytes, got {len(raw)}")
        return cls(z85.encode(raw).decode("ascii"))

    @property
    def raw(self) -> bytes:
        return z85.decode(self.z85.encode("ascii"))

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.raw)

    def __str__(self) -> str:
        return self.z85


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A CURVE key pair loaded from its certificate files."""

    public: PublicKey
    secret_z85: str = field(repr=False)
    path: Path
    """The secret certificate file."""

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint

    @property
    def public_path(self) -> Path:
        return self.path.with_suffix(".key")


def key_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where key pairs and trust files live (see the module docstring); creates nothing."""
    if environ.get(KEY_DIR_ENV):
        return Path(environ[KEY_DIR_ENV]).expanduser().absolute()
    base = environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(base):  # unset, empty or relative: the XDG specification's default
        base = str(Path("~/.config").expanduser())
    return Path(base) / "dpipes"


def ensure_key_dir(path: Path) -> Path:
    """``path``, created with mode 0700 when missing, checked to be a directory only we can write.

    Raises:
        KeyFileError: it cannot be created, is not a directory, is another user's, or others can
            write to it.
    """
    return private_dir(
        path, what="key directory", error=KeyFileError, remedy=f"set {KEY_DIR_ENV} to a directory of your own"
    )


def _check_secret_file(path: Path) -> None:
    try:
        st = path.lstat()
    except OSError as e:
        raise KeyFileError(f"secret key {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"secret key {path} is not a regular file")
    if st.st_uid != os.getuid():
        raise KeyFileError(f"secret key {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()})")
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"secret key {path} is open to others (mode {stat.S_IMODE(st.st_mode):04o}): refusing to use it; "
            f"run 'chmod 600 {path}' if nobody else has read it, else remove it and its .key to make a new pair"
        )


def load_public_key(path: Path) -> PublicKey:
    """The public key in a certificate file (a ``.key`` or a ``.key_secret``).

    Raises:
        KeyFileError: the file is missing or holds no valid public key.
    """
    try:
        public, _secret = zmq.auth.load_certificate(path)
        return PublicKey.parse(public)
    except (OSError, ValueError) as e:
        raise KeyFileError(f"certificate {path}: {e}") from None


def load_keypair(directory: Path, name: str) -> KeyPair:
    """The key pair ``name`` in ``directory``.

    Raises:
        KeyFileError: missing, malformed, or its secret file is not private to us.
    """
    path = Path(directory) / f"{name}.key_secret"
    _check_secret_file(path)
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise KeyFileError(f"secret key {path}: {e}") from None
    if secret is None:
        raise KeyFileError(f"secret key {path} holds no secret-key line")
    try:
        key = PublicKey.parse(public)
        secret_text = secret.decode("ascii")
        PublicKey.parse(secret_text)  # the same form as a public key
    except (ValueError, UnicodeDecodeError) as e:
        raise KeyFileError(f"secret key {path}: {e}") from None
    if zmq.curve_public(secret) != key.z85.encode("ascii"):
        raise KeyFileError(f"secret key {path}: its public key does not belong to its secret key")
    return KeyPair(public=key, secret_z85=secret_text, path=path)


def load_or_create_keypair(directory: Path, name: str) -> tuple[KeyPair, bool]:
    """The key pair ``name`` in ``directory``, created first if there is none; and whether it was.

    Raises:
        KeyFileError: the directory or an existing pair cannot be used.
    """
    directory = ensure_key_dir(Path(directory))
    secret = directory / f"{name}.key_secret"
    if os.path.lexists(secret):
        return load_keypair(directory, name), False
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=directory))  # mode 0700: private meanwhile
    try:
        public_tmp, secret_tmp = zmq.auth.create_certificates(staging, name, metadata={"dpipes": name})
        os.chmod(secret_tmp, 0o600)
        os.chmod(public_tmp, 0o644)
        try:
            os.link(secret_tmp, secret)  # fails if another process made the pair meanwhile
        except FileExistsError:
            return load_keypair(directory, name), False
        os.replace(public_tmp, secret.with_suffix(".key"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    pair = load_keypair(directory, name)
    log.info("created key pair %s in %s: %s", name, directory, pair.fingerprint)
    return pair, True
