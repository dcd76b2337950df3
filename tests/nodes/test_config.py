"""Node configuration: source order, merging, and errors that name the file, the key and the problem."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from dpipes.bus.errors import ConfigError
from dpipes.nodes.config import (
    CONFIG_PATHS_ENV,
    DEFAULT_PORT,
    AppConfig,
    HostPort,
    Limits,
    NodeConfig,
    default_node_name,
    format_config,
    load_config,
    parse_override,
)
from dpipes.nodes.pipeline import check_node_name

FULL = """
name = "alpha"
listen = "127.0.0.1:6000"
allow = ["sort", "uniq"]
metadata_key = "__meta"
insecure = true
interfaces = ["eth0", "wlan0"]

[nodes]
beta = "10.0.0.2:5757"
gamma = "[fd00::3]:5757"

[apps.sort]
version = "9.1"
path = "/opt/coreutils/bin/sort"

[apps.uniq]
version = "9.1"

[limits]
max_stages = 8
credit_bytes = 16777216
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_without_any_file() -> None:
    config = load_config(search_paths=[])
    assert config == NodeConfig(name=default_node_name())
    assert config.listen == HostPort("127.0.0.1", DEFAULT_PORT)
    assert config.allow is None
    assert dict(config.nodes) == {} and dict(config.apps) == {}
    assert config.metadata_key == "__dpipes"
    assert config.limits == Limits()
    assert config.insecure is False
    assert config.interfaces == ()
    assert config.sources == ()
    assert check_node_name(config.name) is None


def test_every_key(tmp_path: Path) -> None:
    path = write(tmp_path / "full.toml", FULL)
    config = load_config(config_file=path, search_paths=[])
    assert config.name == "alpha"
    assert config.listen == HostPort("127.0.0.1", 6000)
    assert config.allow == frozenset({"sort", "uniq"})
    assert config.metadata_key == "__meta"
    assert config.insecure is True
    assert config.interfaces == ("eth0", "wlan0")
    assert dict(config.nodes) == {"beta": HostPort("10.0.0.2", 5757), "gamma": HostPort("fd00::3", 5757)}
    assert str(config.nodes["gamma"]) == "[fd00::3]:5757"
    assert dict(config.apps) == {
        "sort": AppConfig(version="9.1", path="/opt/coreutils/bin/sort"),
        "uniq": AppConfig(version="9.1"),
    }
    assert config.limits == Limits(max_stages=8, credit_bytes=16 << 20)
    assert config.sources == (str(path),)


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(config_file=write(tmp_path / "c.toml", FULL), search_paths=[])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.name = "beta"
    with pytest.raises(TypeError):
        config.nodes["delta"] = HostPort("x", 1)


def test_later_sources_win_and_tables_merge(tmp_path: Path) -> None:
    system = write(
        tmp_path / "system.conf",
        'name = "sys"\nlisten = "0.0.0.0:1000"\nallow = ["a", "b"]\n'
        '[nodes]\nbeta = "b:1"\n[apps.sort]\nversion = "8.0"\npath = "/usr/bin/sort"\n'
        "[limits]\nmax_stages = 3\n",
    )
    user = write(
        tmp_path / "user.rc",
        'name = "usr"\nallow = ["c"]\n[nodes]\ngamma = "g:1"\nbeta = "b2:2"\n[apps.sort]\nversion = "9.1"\n',
    )
    given = write(tmp_path / "given.toml", "[limits]\ncredit_bytes = 33554432\n")
    config = load_config(
        config_file=given,
        search_paths=[system, tmp_path / "missing.conf", user],
        overrides={"name": "cli", "limits.max_stages": 9, "nodes": {"delta": "d:4"}},
    )
    assert config.name == "cli"
    assert config.listen == HostPort("0.0.0.0", 1000)  # only the system file set it
    assert config.allow == frozenset({"c"})  # arrays are replaced, not concatenated
    assert dict(config.nodes) == {
        "beta": HostPort("b2", 2),
        "gamma": HostPort("g", 1),
        "delta": HostPort("d", 4),
    }
    assert config.apps["sort"] == AppConfig(version="9.1", path="/usr/bin/sort")
    assert config.limits == Limits(max_stages=9, credit_bytes=32 << 20)
    assert config.sources == (str(system), str(user), str(given), "command line")


def test_system_paths_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = write(tmp_path / "a.conf", 'name = "first"\ninsecure = true\n')
    second = write(tmp_path / "b.conf", 'name = "second"\n')
    monkeypatch.setenv(CONFIG_PATHS_ENV, os.pathsep.join([str(first), str(tmp_path / "nope"), str(second)]))
    config = load_config()
    assert (config.name, config.insecure) == ("second", True)
    assert load_config(environ={CONFIG_PATHS_ENV: ""}).sources == ()  # set but empty: no system files


def test_home_file_is_found_through_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path / ".dpipesdrc", 'name = "homey"\n')
    assert load_config(search_paths=["~/.dpipesdrc"]).name == "homey"


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: config file not found"):
        load_config(config_file=tmp_path / "nope.toml", search_paths=[])


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(config_file=tmp_path, search_paths=[])  # a directory


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.toml", 'name = "alpha"\n\nlisten = 0.0.0.0:5757\n')
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=path, search_paths=[])
    message = str(caught.value)
    assert message.startswith(f"{path}: invalid TOML")
    assert "line 3" in message


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(config_file=path, search_paths=[])


def test_a_bad_system_file_is_named(tmp_path: Path) -> None:
    good = write(tmp_path / "good.conf", 'name = "ok"\n')
    bad = write(tmp_path / "bad.conf", "insecure = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(search_paths=[good, bad])
    assert str(caught.value) == f"{bad}: key 'insecure': expected true or false, got integer 1"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('lisen = "a:1"', "unknown key 'lisen'; did you mean 'listen'?"),
        ("insecur = true", "unknown key 'insecur'; did you mean 'insecure'?"),
        ("zzz = 1", "unknown key 'zzz'; known keys: allow, apps, insecure, interfaces, key_dir, limits"),
        ("[limits]\nmax_stage = 3", "unknown key 'limits.max_stage'; did you mean 'max_stages'?"),
        ('[apps.sort]\nversoin = "1"', "unknown key 'apps.sort.versoin'; did you mean 'version'?"),
        ("name = 3", "key 'name': expected a string, got integer 3; quote it"),
        ('name = "a.b"', "key 'name': 'a.b' is not a valid node name"),
        ('name = ""', "key 'name': must not be empty"),
        ("listen = 5757", "key 'listen': expected a string 'HOST:PORT', got integer 5757"),
        ('listen = "localhost"', "key 'listen': 'localhost' is not HOST:PORT"),
        ('listen = "host:http"', "key 'listen': port 'http' in 'host:http' is not a number"),
        ('listen = "host:65536"', "key 'listen': port 65536 in 'host:65536' is out of range 0-65535"),
        ('listen = "::1:80"', "put an IPv6 address in brackets"),
        ('listen = "[zz]:80"', "'zz' in '[zz]:80' is not an IPv6 address"),
        ('listen = "10.0.0.300:80"', "is not an IPv4 address"),
        ('listen = "bad host:80"', "'bad host' in 'bad host:80' is not a host name or IP address"),
        ('allow = "sort"', "key 'allow': expected an array of strings, got string 'sort'"),
        ('allow = ["sort", 3]', "key 'allow': item 1: expected a string, got integer 3"),
        ("insecure = 'yes'", "key 'insecure': expected true or false, got string 'yes'"),
        ("interfaces = [true]", "key 'interfaces': item 0: expected a string, got boolean True"),
        ('nodes = "beta"', "key 'nodes': expected a table, got string 'beta'"),
        ('[nodes]\nbeta = "b:0"', "key 'nodes.beta': port 0 in 'b:0' is out of range 1-65535"),
        ('[nodes]\nbeta = ["b:1"]', "key 'nodes.beta': expected a string 'HOST:PORT', got array"),
        ('[nodes]\n"be/ta" = "b:1"', "key 'nodes.be/ta': 'be/ta' is not a valid node name"),
        ("[apps]\nsort = 1", "key 'apps.sort': expected a table, got integer 1"),
        ("[apps.sort]\nversion = 9.1", "key 'apps.sort.version': expected a string like \"9.1\", got float"),
        ('[apps.sort]\npath = "bin/sort"', "key 'apps.sort.path': 'bin/sort' is not an absolute path"),
        ('[apps."bin/sort"]\nversion = "1"', "key 'apps.bin/sort': the table name must be a program name"),
        ("[limits]\nmax_stages = 0", "key 'limits.max_stages': must be at least 1, got 0"),
        ("[limits]\nmax_stages = true", "key 'limits.max_stages': expected an integer, got boolean True"),
        ("[limits]\ncredit_bytes = 1048576", "key 'limits.credit_bytes': must be at least 8388608, got 1048576"),
        ("[limits]\nmax_clients = 0", "key 'limits.max_clients': must be at least 1, got 0"),
        ("[limits]\nmax_clients_per_address = -1", "key 'limits.max_clients_per_address': must be at least 1"),
        ("[limits]\nclient_backlog_bytes = 4096", "key 'limits.client_backlog_bytes': must be at least 1048576"),
        ("[limits]\nmax_held_bytes = 1048576", "key 'limits.max_held_bytes': must be at least 8388608, got 1048576"),
        (
            "[limits]\ncredit_bytes = 33554432\nmax_held_bytes = 16777216",
            "key 'limits.max_held_bytes': must be at least limits.credit_bytes (33554432), got 16777216",
        ),
        ('metadata_key = ""', "key 'metadata_key': must not be empty"),
    ],
)
def test_bad_values_name_file_key_and_problem(tmp_path: Path, toml: str, expected: str) -> None:
    path = write(tmp_path / "node.toml", toml + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config_file=path, search_paths=[])
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert isinstance(caught.value, ValueError)


def test_bad_override_names_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"^command line: key 'limits\.max_stages': expected an integer"):
        load_config(search_paths=[], overrides={"limits.max_stages": "8"})
    with pytest.raises(ConfigError, match=r"^command line: unknown key 'nmae'; did you mean 'name'\?"):
        load_config(search_paths=[], overrides={"nmae": "x"})
    with pytest.raises(ConfigError, match=r"'name' is not a table"):
        load_config(search_paths=[], overrides={"name": "x", "name.sub": 1})


def test_listen_port_zero_is_allowed() -> None:
    assert load_config(search_paths=[], overrides={"listen": "127.0.0.1:0"}).listen.port == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("limits.max_stages=8", ("limits.max_stages", 8)),
        ("insecure=true", ("insecure", True)),
        ('allow=["sort", "uniq"]', ("allow", ["sort", "uniq"])),
        ("listen=0.0.0.0:5757", ("listen", "0.0.0.0:5757")),
        ('name="alpha"', ("name", "alpha")),
        ("name=alpha", ("name", "alpha")),
        ("metadata_key= a=b ", ("metadata_key", "a=b")),
    ],
)
def test_parse_override(text: str, expected: tuple[str, object]) -> None:
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["novalue", "=x", "limits.=3", ".x=1"])
def test_parse_override_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override(text)


def test_overrides_from_parse_override_feed_load_config() -> None:
    overrides = dict(parse_override(t) for t in ["limits.max_stages=5", "insecure=true", "listen=[::]:7000"])
    config = load_config(search_paths=[], overrides=overrides)
    assert (config.limits.max_stages, config.insecure, str(config.listen)) == (5, True, "[::]:7000")


def test_host_port_round_trips() -> None:
    for text in ("0.0.0.0:5757", "beta.lan:1", "[::1]:80", "*:5757", "host-1.example.com.:65535"):
        assert str(HostPort.parse(text)) == text


def test_xdg_config_file_is_read_between_etc_and_dpipesdrc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    xdg = tmp_path / "xdg"
    (xdg / "dpipes").mkdir(parents=True)
    xdg_file = write(xdg / "dpipes" / "dpipesd.toml", 'name = "fromxdg"\nlisten = "127.0.0.1:6001"\n')
    rc = write(tmp_path / "home" / ".dpipesdrc", 'name = "fromrc"\n')
    config = load_config(environ={"XDG_CONFIG_HOME": str(xdg)})
    assert (config.name, str(config.listen)) == ("fromrc", "127.0.0.1:6001")  # ~/.dpipesdrc is read last
    assert config.sources[-2:] == (str(xdg_file), str(rc))


@pytest.mark.parametrize("xdg_value", [None, "", "relative/dir"])
def test_xdg_default_is_dot_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, xdg_value: str | None) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".config" / "dpipes").mkdir(parents=True)
    write(tmp_path / ".config" / "dpipes" / "dpipesd.toml", 'name = "dotconfig"\n')
    environ = {} if xdg_value is None else {"XDG_CONFIG_HOME": xdg_value}
    config = load_config(search_paths=["$XDG_CONFIG_HOME/dpipes/dpipesd.toml"], environ=environ)
    assert config.name == "dotconfig"


def test_origins_name_the_source_of_each_key(tmp_path: Path) -> None:
    first = write(tmp_path / "a.conf", FULL)
    second = write(tmp_path / "b.conf", 'listen = "127.0.0.1:6002"\n[apps.sort]\nversion = "9.2"\n')
    config = load_config(search_paths=[first, second], overrides={"nodes": {"delta": "10.0.0.4:5757"}})
    origins = dict(config.origins)
    assert origins["name"] == str(first)
    assert origins["listen"] == str(second)
    assert (origins["apps.sort.version"], origins["apps.sort.path"]) == (str(second), str(first))
    assert (origins["nodes.beta"], origins["nodes.delta"]) == (str(first), "command line")
    assert "metadata_argv" not in origins  # a default


def test_format_config_reads_back_and_says_where_each_value_came_from(tmp_path: Path) -> None:
    conf = write(tmp_path / "a.conf", FULL)
    config = load_config(search_paths=[conf], overrides={"limits.max_stages": 9, "nodes": {"x": "h:1"}})
    text = format_config(config, labels={"nodes": "--peer"})
    lines = {line.split("=")[0].strip(): line for line in text.splitlines() if "=" in line and line[0] != "#"}
    assert lines["listen"].endswith(f"# {conf}")
    assert lines["max_stages"].endswith("# command line")
    assert lines["x"].endswith("# --peer")
    assert lines["metadata_argv"].endswith("# default")
    reread = tmp_path / "effective.toml"
    reread.write_text(text)
    assert load_config(config_file=reread, search_paths=[]) == dataclasses.replace(config, sources=(str(reread),))


def test_same_named_hosts_get_different_default_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dpipes.nodes import config as config_module

    monkeypatch.setattr(config_module.socket, "gethostname", lambda: "raspberrypi.local")
    names = set()
    for machine in ("0f3a9c", "7be210"):
        (tmp_path / machine).write_text(machine + "\n")
        monkeypatch.setattr(config_module, "MACHINE_ID_PATHS", (str(tmp_path / machine),))
        name = default_node_name()
        assert name == default_node_name()  # the same across restarts
        assert name.startswith("raspberrypi-")
        names.add(name)
    assert len(names) == 2


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("/bin/sh", "'/bin/sh' is not a bare program name"),
        ("sort 'unclosed", "No closing quotation"),
        ("c?t -n", "'c?t' is not a bare program name"),
        ("%../x", "'../x' is not a bare program name"),
    ],
)
def test_a_bad_allow_entry_is_refused_naming_it(tmp_path: Path, entry: str, problem: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f"allow = [\"sort -r\", {json.dumps(entry)}]\n")
    with pytest.raises(ConfigError) as refused:
        load_config(config_file=path, search_paths=())
    assert "key 'allow': item 1: option " in str(refused.value) and problem in str(refused.value)


def test_the_hubs_client_and_memory_limits_are_limits_keys(tmp_path: Path) -> None:
    conf = write(
        tmp_path / "node.toml",
        "[limits]\nmax_clients = 16\nmax_clients_per_address = 4\n"
        "client_backlog_bytes = 2097152\nmax_held_bytes = 33554432\n",
    )
    config = load_config(config_file=conf, search_paths=[], overrides={"limits.max_clients": 32})
    assert config.limits == Limits(
        max_clients=32, max_clients_per_address=4, client_backlog_bytes=2 << 20, max_held_bytes=32 << 20
    )
    assert config.origins["limits.max_clients"] == "command line"
    lines = format_config(config).splitlines()
    assert any(x.startswith("max_held_bytes = 33554432") and x.endswith(f"# {conf}") for x in lines)
    assert any(x.startswith("max_clients = 32") and x.endswith("# command line") for x in lines)
    defaults = load_config(search_paths=[]).limits  # the hub's own defaults, documented in the key table
    assert (defaults.max_clients, defaults.max_clients_per_address) == (512, 128)
    assert (defaults.client_backlog_bytes, defaults.max_held_bytes) == (64 << 20, 1 << 30)
    assert all(f"{key} = {getattr(defaults, key)}" in config_module_doc() for key in ("max_clients", "max_held_bytes"))


def config_module_doc() -> str:
    from dpipes.nodes import config as config_module

    return config_module.__doc__ or ""
