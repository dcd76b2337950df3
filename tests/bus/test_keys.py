"""Key pairs on disk: created once, private whatever the umask, refused when others can read them."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
import zmq.auth

from dpipes.bus import keys
from dpipes.bus.errors import KeyFileError
from dpipes.bus.keys import PublicKey


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_use_creates_a_private_pair_then_loads_it(tmp_path: Path) -> None:
    where = tmp_path / "conf" / "dpipes"
    pair, created = keys.load_or_create_keypair(where, keys.NODE_KEY)
    assert created
    assert mode(where) == 0o700
    assert mode(where / "node.key_secret") == 0o600
    assert mode(where / "node.key") == 0o644
    again, created_again = keys.load_or_create_keypair(where, keys.NODE_KEY)
    assert not created_again and again == pair
    # pyzmq's own reader agrees with what we loaded, and the public file holds no secret
    assert zmq.auth.load_certificate(where / "node.key") == (pair.public.z85.encode(), None)
    assert zmq.curve_public(pair.secret_z85.encode()) == pair.public.z85.encode()
    assert pair.secret_z85 not in repr(pair)


def test_pair_is_private_under_umask_000(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from dpipes.bus import keys; "
        "keys.load_or_create_keypair(Path(sys.argv[1]), keys.CLIENT_KEY)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "k")], check=True, umask=0o000, timeout=60)
    assert mode(tmp_path / "k") == 0o700
    assert mode(tmp_path / "k" / "client.key_secret") == 0o600


def test_a_secret_key_others_can_read_is_refused(tmp_path: Path) -> None:
    keys.load_or_create_keypair(tmp_path, keys.CLIENT_KEY)
    (tmp_path / "client.key_secret").chmod(0o644)
    with pytest.raises(KeyFileError, match=r"open to others \(mode 0644\)"):
        keys.load_or_create_keypair(tmp_path, keys.CLIENT_KEY)


def test_a_key_dir_others_can_write_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    with pytest.raises(KeyFileError, match="writable by its group or others"):
        keys.load_or_create_keypair(tmp_path, keys.NODE_KEY)


def test_a_secret_file_whose_halves_do_not_match_is_refused(tmp_path: Path) -> None:
    pair, _ = keys.load_or_create_keypair(tmp_path, keys.NODE_KEY)
    other, _ = keys.load_or_create_keypair(tmp_path / "other", keys.NODE_KEY)
    secret = tmp_path / "node.key_secret"
    secret.write_text(secret.read_text().replace(pair.public.z85, other.public.z85))
    with pytest.raises(KeyFileError, match="does not belong to its secret key"):
        keys.load_keypair(tmp_path, keys.NODE_KEY)


def test_fingerprint_is_ssh_style_sha256_of_the_raw_key() -> None:
    public, _ = zmq.curve_keypair()
    key = PublicKey.parse(public)
    expected = base64.b64encode(hashlib.sha256(key.raw).digest()).decode().rstrip("=")
    assert key.fingerprint == "SHA256:" + expected
    assert len(key.fingerprint) == len("SHA256:") + 43
    assert PublicKey.from_raw(key.raw) == key


@pytest.mark.parametrize("text", ["", "short", "x" * 41, "~" * 40, " " * 40])
def test_malformed_public_keys_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        PublicKey.parse(text)


def test_key_dir_follows_xdg(tmp_path: Path) -> None:
    assert keys.key_dir({"DPIPES_KEY_DIR": str(tmp_path)}) == tmp_path
    assert keys.key_dir({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "dpipes"
    home = Path(os.path.expanduser("~"))
    assert keys.key_dir({"XDG_CONFIG_HOME": "relative"}) == home / ".config" / "dpipes"
