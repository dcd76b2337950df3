"""authorized_keys, known_nodes and the key policy: parsing, name tricks, argument tricks, key changes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import zmq

from dpipes.bus.errors import KeyChanged, TrustFileError
from dpipes.bus.keys import PublicKey
from dpipes.bus.trust import (
    AuthorizedKey,
    AuthorizedKeys,
    Identity,
    KeyPolicy,
    KnownNodes,
    ProgramRule,
    TrustStore,
    UnknownNode,
)


def new_key() -> PublicKey:
    return PublicKey.parse(zmq.curve_keypair()[0])


ALICE = new_key()
BOB = new_key()
ALPHA = new_key()

SAFE_SORT = "run=\"sort -r -n -u '-k[0-9]*' '-t?'\""
AUTHORIZED = f"""\
# alice: sort with a few options, uniq -c, cat with no argument, one exact command; may tap
{SAFE_SORT},run="uniq -c",run="cat",exact="wc -l",tap curve {ALICE} alice@laptop

curve {BOB} bob (may connect, may do nothing)
"""


def policy(text: str = AUTHORIZED) -> KeyPolicy:
    return KeyPolicy(AuthorizedKeys.parse(text, "authorized_keys"))


def alice() -> Identity:
    return Identity.key(ALICE.fingerprint)


@pytest.mark.parametrize(
    "argv",
    [
        ["sort"],
        ["sort", "-r"],
        ["sort", "-n", "-k2", "-t,"],
        ["uniq", "-c"],
        ["uniq"],
        ["cat"],
        ["wc", "-l"],
    ],
)
def test_alice_may_run_what_her_line_allows(argv: list[str]) -> None:
    decision = policy().may_run(alice(), argv)
    assert decision.allowed, decision.reason


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["sh"], "'sh'"),
        (["/bin/sh"], "'/bin/sh'"),
        (["/usr/bin/../bin/sh"], "'/usr/bin/../bin/sh'"),
        (["env"], "'env'"),
        (["c?t"], "'c?t'"),
        (["cat$(id)"], "'cat$(id)'"),
        (["/bin/cat"], "'/bin/cat'"),
        (["sort", "--compress-program=evil.sh"], "'--compress-program=evil.sh'"),
        (["sort", "-o", "/etc/passwd"], "'-o'"),
        (["sort", "-ro", "FILE"], "'-ro'"),
        (["sort", "--compress-prog=evil.sh"], "'--compress-prog=evil.sh'"),  # GNU abbreviations too
        (["cat", "/etc/shadow"], "'/etc/shadow'"),
        (["wc", "-l", "-c"], "'wc -l'"),
        (["wc"], "'wc -l'"),
    ],
)
def test_name_and_argument_tricks_are_refused_and_named(argv: list[str], named: str) -> None:
    decision = policy().may_run(alice(), argv)
    assert not decision.allowed
    assert named in decision.reason
    assert ALICE.fingerprint in decision.reason and "alice@laptop" in decision.reason
    assert "authorized_keys:2" in decision.reason


def test_unknown_keys_and_keys_without_rights_run_nothing() -> None:
    stranger = Identity.key(new_key().fingerprint)
    refused = policy().may_run(stranger, ["cat"])
    assert not refused.allowed and "not in authorized_keys" in refused.reason
    bob = policy().may_run(Identity.key(BOB.fingerprint), ["cat"])
    assert not bob.allowed and "allowed: none" in bob.reason
    assert not policy().may_tap(stranger)
    assert not policy().may_tap(Identity.key(BOB.fingerprint))
    assert policy().may_tap(alice())


def test_a_node_key_is_not_a_client() -> None:
    known = KnownNodes.parse(f"alpha {ALPHA.fingerprint} {ALPHA}\n")
    decision = KeyPolicy(AuthorizedKeys.parse(AUTHORIZED), known).may_run(Identity.key(ALPHA.fingerprint), ["cat"])
    assert not decision.allowed and "node alpha's key" in decision.reason


def test_the_local_user_and_insecure_nodes_may_do_everything() -> None:
    assert policy().may_run(Identity.local_user(0), ["sh", "-c", "id"])
    from dpipes.bus.trust import INSECURE

    assert policy().may_run(INSECURE, ["sh"])
    assert policy().may_tap(Identity.local_user(1000))


def test_any_allows_everything_and_plugins_are_apart() -> None:
    p = policy(f'any curve {ALICE}\nplugin="top -n*" curve {BOB}\n')
    assert p.may_run(alice(), ["sh", "-c", "anything"]) and p.may_tap(alice())
    bob = Identity.key(BOB.fingerprint)
    assert p.may_run(bob, ["top", "-n5"], plugin=True)
    assert not p.may_run(bob, ["top", "-n5"])  # a plugin right is not a program right


def test_entries_format_and_parse_back() -> None:
    parsed = AuthorizedKeys.parse(AUTHORIZED)
    again = AuthorizedKeys.parse(parsed.format())
    assert [e.format() for e in again.entries] == [e.format() for e in parsed.entries]
    tricky = AuthorizedKey(ALICE, "a b", (ProgramRule("grep", ('say "hi"', "a\\b", "x,y")),))
    back = AuthorizedKeys.parse(AuthorizedKeys((tricky,)).format()).entries[0]
    assert back.rules == tricky.rules and back.comment == "a b"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (f"curve {ALICE}x", "40 characters"),
        ("curve", "no 'curve' before a key"),
        ("curve ", "no 'curve' before a key"),
        (f"ssh-ed25519 {ALICE}", "no 'curve' before a key"),
        (f"=x curve {ALICE}", "expected an option name"),
        (f"run=sort curve {ALICE}", "double quotes"),
        (f'run="sort curve {ALICE}', "missing closing double quote"),
        (f'run="/bin/sh" curve {ALICE}', "not a bare program name"),
        (f'run="c?t" curve {ALICE}', "not a bare program name"),
        (f'run="" curve {ALICE}', "empty"),
        (f'run="sort \'-k" curve {ALICE}', "No closing quotation"),
        (f'tap="yes" curve {ALICE}', "takes no value"),
        (f"sudo curve {ALICE}", "unknown option 'sudo'"),
        (f"tap;rm curve {ALICE}", "unexpected ';'"),
    ],
)
def test_malformed_lines_are_named_by_file_and_line(line: str, problem: str) -> None:
    with pytest.raises(TrustFileError) as caught:
        AuthorizedKeys.parse(f"# header\n\n{line}\n", "/etc/dpipes/authorized_keys")
    assert str(caught.value).startswith("/etc/dpipes/authorized_keys:3: ")
    assert problem in str(caught.value)


def test_a_key_listed_twice_is_refused() -> None:
    with pytest.raises(TrustFileError, match=r"f:2: key SHA256:\S+ is already listed at f:1"):
        AuthorizedKeys.parse(f"curve {ALICE}\ntap curve {ALICE}\n", "f")


def test_trust_and_untrust() -> None:
    keys = AuthorizedKeys().with_entry(AuthorizedKey(ALICE, "alice", tap=True))
    keys = keys.with_entry(AuthorizedKey(BOB, "bob"))
    assert keys.get(ALICE.fingerprint) is not None
    keys, gone = keys.without("alice")
    assert [e.key for e in gone] == [ALICE] and keys.get(ALICE.fingerprint) is None
    keys, gone = keys.without(BOB.fingerprint)
    assert gone and keys.entries == ()


def test_pinned_node_is_checked_and_a_changed_key_refused_loudly(tmp_path: Path) -> None:
    path = tmp_path / "known_nodes"
    known = KnownNodes.load(path)
    known.pin("alpha", ALPHA.fingerprint)  # pinned by fingerprint only, as read off alpha itself
    known.save(path)
    known = KnownNodes.load(path)
    assert known.key_for("alpha") is None
    known.check("alpha", ALPHA)
    assert known.key_for("alpha") == ALPHA  # now we can connect to it
    assert KnownNodes.load(path).key_for("alpha") == ALPHA  # and it is recorded
    impostor = new_key()
    with pytest.raises(KeyChanged) as caught:
        known.check("alpha", impostor)
    message = str(caught.value)
    assert "node alpha" in message and impostor.fingerprint in message and ALPHA.fingerprint in message
    assert f"{path}:2" in KnownNodes.load(path).entries["alpha"].where  # the header is line 1


def test_unknown_node_refused_unless_trust_on_first_use(tmp_path: Path) -> None:
    with pytest.raises(UnknownNode, match=re.escape(f"dpipes keys pin beta {ALPHA.fingerprint}")):
        KnownNodes().check("beta", ALPHA)
    path = tmp_path / "known_nodes"
    tofu = KnownNodes.load(path, tofu=True)
    tofu.check("beta", ALPHA)
    assert KnownNodes.load(path).key_for("beta") == ALPHA  # recorded at once
    with pytest.raises(KeyChanged):
        KnownNodes.load(path, tofu=True).check("beta", new_key())  # first use only


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("alpha", "expected 'NODE FINGERPRINT [KEY]'"),
        ("alpha SHA256:short", "is not a fingerprint"),
        (f"alpha {ALPHA.fingerprint} {BOB}", "the key's fingerprint is"),
        (f"al/pha {ALPHA.fingerprint}", "is not a node name"),
    ],
)
def test_malformed_known_nodes_lines_are_named(line: str, problem: str) -> None:
    with pytest.raises(TrustFileError, match=r"^known:1: ") as caught:
        KnownNodes.parse(line, "known")
    assert problem in str(caught.value)


def test_store_admits_clients_and_known_nodes_only() -> None:
    store = TrustStore(AuthorizedKeys.parse(AUTHORIZED), KnownNodes.parse(f"alpha {ALPHA.fingerprint}"))
    assert store.admits(ALICE) and store.admits(BOB) and store.admits(ALPHA)
    refused = store.admits(new_key())
    assert not refused.allowed and "neither an authorized client nor a known node" in refused.reason
