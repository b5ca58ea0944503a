"""containerd's hosts.toml, read as containerd reads it: which folder, which hosts in which order, what each may do."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prewarm.config import Settings
from prewarm.errors import ConfigError
from prewarm.resolve.registry.hosts import (
    MAX_HOSTS_TOML,
    Endpoint,
    host_dir,
    parse_hosts_toml,
    registry_endpoints,
)

REG = "registry.example:5000"
DEFAULT = Endpoint(scheme="https", host=REG)


def parse(text: str, registry: str = REG, folder: Path = Path("/etc/containerd/certs.d/x")) -> list[Endpoint]:
    return parse_hosts_toml(text.encode(), registry, folder, Endpoint(scheme="https", host=registry))


def test_mirrors_come_first_in_file_order_then_the_server() -> None:
    # Given a file with two mirrors and a server
    eps = parse('''
server = "https://registry.example:5000"

[host."https://mirror-b.example"]
  capabilities = ["pull", "resolve"]

[host."http://10.0.0.9:5001"]
  capabilities = ["pull"]
  [host."http://10.0.0.9:5001".header]
    x-custom = "1"
''')
    # Then they are tried in the order written, the server last
    assert [(e.scheme, e.host, e.path) for e in eps] == [
        ("https", "mirror-b.example", "/v2"), ("http", "10.0.0.9:5001", "/v2"),
        ("https", "registry.example:5000", "/v2")]
    assert eps[0].capabilities == {"pull", "resolve"} and eps[1].capabilities == {"pull"}
    assert eps[2].capabilities == {"pull", "resolve", "push"}
    # And only hosts other than the registry are mirrors (their requests carry ?ns=)
    assert [e.mirror for e in eps] == [True, True, False]
    assert eps[1].header == (("x-custom", "1"),)


def test_paths_as_containerd_builds_them() -> None:
    eps = parse('''
[host."https://proxy.example/cache"]
[host."https://proxy.example/already/v2"]
[host."https://odd.example/api/"]
  override_path = true
[host."mirror.example:8443"]
''')
    assert [e.api_root for e in eps] == [
        "https://proxy.example/cache/v2",     # /v2 appended
        "https://proxy.example/already/v2",   # not twice
        "https://odd.example/api",            # override_path: the path is the API root
        "https://mirror.example:8443/v2",     # no scheme: https
        "https://registry.example:5000/v2",   # no server: the registry itself
    ]


def test_tls_settings_relative_to_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "registry.example_5000_"
    eps = parse('''
server = "https://registry.example:5000"
ca = "root.pem"
skip_verify = false

[host."https://m1.example"]
  ca = ["/etc/ssl/a.pem", "b.pem"]
  client = [["c.cert", "c.key"], "both.pem"]
  skip_verify = true

[host."https://m2.example"]
  client = "only.pem"
''', folder=folder)
    m1, m2, server = eps
    assert m1.ca == (Path("/etc/ssl/a.pem"), folder / "b.pem")
    assert m1.client == ((folder / "c.cert", folder / "c.key"), (folder / "both.pem", None))
    assert m1.skip_verify is True
    assert m2.client == ((folder / "only.pem", None),) and m2.skip_verify is None
    assert server.ca == (folder / "root.pem",) and server.skip_verify is False


def test_docker_hub_server_is_not_a_mirror() -> None:
    eps = parse('server = "https://registry-1.docker.io"\n[host."https://hub-mirror.example"]\n', registry="docker.io")
    assert [e.mirror for e in eps] == [True, False]


def test_top_level_options_apply_to_the_registry_itself_without_a_server() -> None:
    eps = parse('skip_verify = true\ncapabilities = ["pull"]\n')
    # containerd gives the default host every capability, but keeps its TLS settings
    assert eps == [Endpoint(scheme="https", host=REG, skip_verify=True)]


@pytest.mark.parametrize("text,says", [
    ('server = "https://x', "not valid TOML"),
    ('server = 5', "'server' must be a URL"),
    ('host = "x"', "'host' must be tables"),
    ('[host."ftp://m.example"]', "http or https"),
    ('[host."https://m.example:port"]', "invalid port"),
    ('[host."https://user@m.example"]', "without user"),
    ('[host."https://m.example/?q=1"]', "without user, query"),
    ('[host."https://m.example"]\ncapabilities = "pull"', "'capabilities' must be a list"),
    ('[host."https://m.example"]\ncapabilities = ["pull", "fetch"]', "unknown capability 'fetch'"),
    ('[host."https://m.example"]\nca = 1', "'ca' must be a file name"),
    ('[host."https://m.example"]\nclient = [["a"]]', "'client' must be"),
    ('[host."https://m.example"]\nclient = 3', "'client' must be"),
    ('[host."https://m.example"]\nskip_verify = "yes"', "'skip_verify' must be true or false"),
    ('[host."https://m.example"]\noverride_path = 1', "'override_path' must be true or false"),
    ('[host."https://m.example"]\nheader = "x"', "'header' must be a table"),
    ('[host."https://m.example".header]\nx = "a\\nb"', "on one line"),
    ('[host."https://m.example"]\ndial_timeout = 3', "'dial_timeout' must be a duration"),
])
def test_a_malformed_file_is_a_config_error_naming_the_key(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says.replace("?", r"\?").replace("[", r"\[")) as err:
        parse(text)
    assert "hosts.toml" in str(err.value)


def test_folder_lookup_follows_containerd(tmp_path: Path) -> None:
    # Given host_port_, host:port and _default folders
    (tmp_path / "reg.example_5000_").mkdir()
    (tmp_path / "reg.example:5001").mkdir()
    (tmp_path / "_default").mkdir()
    # Then host_port_ is found first, host:port next, and anything else gets _default
    assert host_dir(tmp_path, "reg.example:5000") == tmp_path / "reg.example_5000_"
    assert host_dir(tmp_path, "reg.example:5001") == tmp_path / "reg.example:5001"
    assert host_dir(tmp_path, "other.example") == tmp_path / "_default"
    (tmp_path / "_default").rmdir()
    assert host_dir(tmp_path, "other.example") is None
    assert host_dir(tmp_path, "..") is None


def test_a_folder_without_hosts_toml_holds_docker_cert_files(tmp_path: Path) -> None:
    folder = tmp_path / "reg.example"
    folder.mkdir()
    for name in ("ca.crt", "client.cert", "client.key", "lonely.cert", "notes.txt"):
        (folder / name).write_text("x")
    # Then the registry itself is reached with them (Docker's certs.d layout)
    assert registry_endpoints(tmp_path, "reg.example", Endpoint("https", "reg.example")) == [
        Endpoint("https", "reg.example", ca=(folder / "ca.crt",),
                 client=((folder / "client.cert", folder / "client.key"), (folder / "lonely.cert", None)))]
    # And with no folder at all (nor a config path), the registry itself as it is
    assert registry_endpoints(tmp_path, "none.example", DEFAULT) == [DEFAULT]
    assert registry_endpoints(None, "reg.example", DEFAULT) == [DEFAULT]


def test_a_huge_hosts_toml_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "reg.example"
    folder.mkdir()
    (folder / "hosts.toml").write_bytes(b"#" * (MAX_HOSTS_TOML + 1))
    with pytest.raises(ConfigError, match="more than"):
        registry_endpoints(tmp_path, "reg.example", DEFAULT)


def test_a_registry_with_a_host_port_folder_is_allowed(tmp_path: Path) -> None:
    """PREWARM_REGISTRIES: containerd names the folder of host:port host_port_."""
    (tmp_path / "reg.example_5000_").mkdir()
    (tmp_path / "_default").mkdir()
    s = Settings(containerd_hosts_dir=tmp_path)
    assert s.registry_allowed("reg.example:5000")
    assert not s.registry_allowed("reg.example:5001")
    assert not s.registry_allowed("_default")


# === any bytes: a list of endpoints or a ConfigError, nothing else ===========

_keys = st.sampled_from(["server", "ca", "client", "skip_verify", "override_path", "capabilities", "header",
                         "dial_timeout", "other"])
_scalars = st.one_of(st.booleans(), st.integers(-5, 5), st.text(string.printable, max_size=20),
                     st.lists(st.text(string.printable, max_size=10), max_size=3),
                     st.lists(st.lists(st.text(string.ascii_letters, max_size=5), max_size=3), max_size=2))


def _toml_value(v: object) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v)  # JSON strings, numbers and arrays are TOML too


@settings(max_examples=300, deadline=None)
@given(top=st.dictionaries(_keys, _scalars, max_size=4),
       hosts=st.lists(st.tuples(st.sampled_from(["https://m.example", "http://10.0.0.1:5000", "m2.example/p",
                                                 "ftp://x", "https://m.example:bad", ""]),
                                st.dictionaries(_keys, _scalars, max_size=4)), max_size=3))
def test_any_hosts_toml_parses_or_is_a_config_error(top: dict, hosts: list) -> None:
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for name, table in hosts:
        lines.append(f'[host."{name}"]')
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    try:
        eps = parse("\n".join(lines))
    except ConfigError:
        return
    assert eps and all(e.scheme in ("http", "https") and e.host for e in eps)
    assert all(e.capabilities <= {"pull", "resolve", "push"} and e.capabilities for e in eps)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_config_error(data: bytes) -> None:
    try:
        parse_hosts_toml(data, REG, Path("/x"), DEFAULT)
    except ConfigError:
        pass


def test_an_unbalanced_bracket_is_a_config_error_and_a_refused_realm_or_redirect() -> None:
    # hypothesis found `server = "["`: urlsplit raises ValueError ("Invalid IPv6 URL")
    with pytest.raises(ConfigError, match="not a valid URL"):
        parse('server = "["')
    from prewarm.resolve.registry.hosts import realm_refusal, redirect_refusal

    assert realm_refusal("https://[", resolve=lambda host: []) == "it is not a valid URL"
    assert redirect_refusal("https://reg.example", "https://[x/v2/", resolve=lambda host: []) is not None
