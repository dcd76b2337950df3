"""``dpipes keys`` as a user runs it: show, trust, list, pin, untrust, in a key directory of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dpipes.bus.keys import load_keypair
from dpipes.bus.trust import AuthorizedKeys, Identity, KeyPolicy, KnownNodes


def keys(key_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DPIPES_KEY_DIR": str(key_dir), "DPIPES_CONFIG_PATHS": ""}
    return subprocess.run(
        [sys.executable, "-m", "dpipes.tools.dpipes", "keys", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_keys_round_trip(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    shown = keys(mine)
    assert shown.returncode == 0, shown.stderr
    pair = load_keypair(mine, "client")
    assert shown.stdout.splitlines()[0] == f"client  {pair.fingerprint}"
    assert f"key {pair.public}" in shown.stdout
    assert "created your client key pair" in shown.stderr
    assert "created" not in keys(mine).stderr  # once only

    node = tmp_path / "node"
    trusted = keys(node, "trust", str(pair.public_path), "--comment", "alice", "--run", "sort -r '-k*'", "--tap")
    assert trusted.returncode == 0, trusted.stderr
    policy = KeyPolicy(AuthorizedKeys.load(node / "authorized_keys"))
    alice = Identity.key(pair.fingerprint)
    assert policy.may_run(alice, ["sort", "-r", "-k2"]) and policy.may_tap(alice)
    assert not policy.may_run(alice, ["sort", "-o", "x"])

    listed = keys(node, "list")
    assert f"{pair.fingerprint}  alice  run=\"sort -r '-k*'\",tap" in listed.stdout

    pinned = keys(node, "pin", "beta", pair.fingerprint)
    assert pinned.returncode == 0, pinned.stderr
    assert KnownNodes.load(node / "known_nodes").entries["beta"].fingerprint == pair.fingerprint

    removed = keys(node, "untrust", "alice")
    assert removed.stdout.startswith(f"removed client key {pair.fingerprint} (alice)")
    assert AuthorizedKeys.load(node / "authorized_keys").entries == ()
    assert keys(node, "untrust", "beta").returncode == 0
    again = keys(node, "untrust", "beta")
    assert again.returncode == 1 and "no client key or node matches 'beta'" in again.stderr


def test_a_key_that_starts_with_a_dash_is_a_key_not_an_option(tmp_path: Path) -> None:
    from dpipes.bus.keys import PublicKey

    # Z85 writes a value of 63 * 85**4 in the first four bytes as '-' first (one key in 85 does so).
    key = PublicKey.from_raw((63 * 85**4).to_bytes(4, "big") + os.urandom(28))
    assert key.z85.startswith("-")
    pinned = keys(tmp_path, "pin", "beta", key.z85)  # as a daemon's ready line prints it
    assert pinned.returncode == 0, pinned.stderr
    assert KnownNodes.load(tmp_path / "known_nodes").entries["beta"].fingerprint == key.fingerprint
    trusted = keys(tmp_path, "trust", key.z85, "--comment", "dash", "--run", "cat")
    assert trusted.returncode == 0, trusted.stderr
    assert AuthorizedKeys.load(tmp_path / "authorized_keys").entries[0].comment == "dash"
    assert keys(tmp_path, "pin", "gamma", "-x").returncode == 2  # not a key: still an unknown option


def test_keys_usage_errors_exit_2(tmp_path: Path) -> None:
    bad_key = keys(tmp_path, "trust", "not-a-key")
    assert bad_key.returncode == 2 and "neither a public key nor a key file" in bad_key.stderr
    bad_pin = keys(tmp_path, "pin", "beta", "SHA256:short")
    assert bad_pin.returncode == 2 and "is not a fingerprint" in bad_pin.stderr
    assert keys(tmp_path).returncode == 0  # makes client.key
    bad_rule = keys(tmp_path, "trust", str(tmp_path / "client.key"), "--run", "/bin/sh")
    assert bad_rule.returncode == 1 and "'/bin/sh' is not a bare program name" in bad_rule.stderr
    assert not (tmp_path / "authorized_keys").exists()


def test_a_malformed_authorized_keys_is_named_by_line(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    (tmp_path / "authorized_keys").write_text("# ok\nrun=sort curve x\n")
    listed = keys(tmp_path, "list")
    assert listed.returncode == 1
    assert listed.stderr.startswith(f"dpipes: {tmp_path}/authorized_keys:2: ")
