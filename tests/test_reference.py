"""Image reference parsing: a table of Docker's rules, and a hypothesis round-trip."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prewarm.errors import InvalidReference
from prewarm.resolve.reference import Reference, parse_reference

D = "sha256:" + "ab" * 32

VALID = [
    # typed                                    registry            repository            tag       digest
    ("ubuntu",                                 "docker.io",        "library/ubuntu",     "latest", None),
    ("ubuntu:22.04",                           "docker.io",        "library/ubuntu",     "22.04",  None),
    ("library/ubuntu",                         "docker.io",        "library/ubuntu",     "latest", None),
    ("docker.io/ubuntu",                       "docker.io",        "library/ubuntu",     "latest", None),
    ("index.docker.io/ubuntu:20.04",           "docker.io",        "library/ubuntu",     "20.04",  None),
    ("registry-1.docker.io/ubuntu",            "docker.io",        "library/ubuntu",     "latest", None),
    ("registry-1.docker.io/org/app:1",         "docker.io",        "org/app",            "1",      None),
    ("docker.io/org/app",                      "docker.io",        "org/app",            "latest", None),
    ("org/app:v1.2_3-rc",                      "docker.io",        "org/app",            "v1.2_3-rc", None),
    ("localhost/app",                          "localhost",        "app",                "latest", None),
    ("localhost:5000/a/b/c:tag",               "localhost:5000",   "a/b/c",              "tag",    None),
    ("127.0.0.1:5000/test/x",                  "127.0.0.1:5000",   "test/x",             "latest", None),
    ("ghcr.io/org/sub/img:1",                  "ghcr.io",          "org/sub/img",        "1",      None),
    (f"ghcr.io/org/img@{D}",                   "ghcr.io",          "org/img",            None,     D),
    (f"ghcr.io/org/img:1.0@{D}",               "ghcr.io",          "org/img",            "1.0",    D),
    (f"ubuntu@{D}",                            "docker.io",        "library/ubuntu",     None,     D),
    ("Registry.Example/a",                     "Registry.Example", "a",                  "latest", None),
    ("[::1]:5000/a",                           "[::1]:5000",       "a",                  "latest", None),
    ("a__b/c--d/e.f_g",                        "docker.io",        "a__b/c--d/e.f_g",    "latest", None),
]

INVALID = [
    ("", "empty"),
    ("   ", "empty"),
    ("Ubuntu", "must be lowercase"),
    ("docker.io/Org/app", "must be lowercase"),
    ("ubuntu:", "tag ''"),
    ("ubuntu:-bad", "tag '-bad'"),
    ("ubuntu:" + "t" * 129, "1-128 characters"),
    ("ubuntu@sha256:abc", "not a digest"),
    ("ubuntu@md5:" + "a" * 32, "not a digest"),
    ("a//b", "empty component"),
    ("a/b/", "empty component"),
    ("https://ghcr.io/a", "drop the scheme"),
    ("a b", "whitespace"),
    ("a_/b", "may only hold"),
    ("-a", "may only hold"),
    ("ghcr.io:abc/a", "not a valid host"),
    ("ghcr.io/" + "a" * 250, "longer than 255"),
]


@pytest.mark.parametrize("typed,registry,repository,tag,digest", VALID)
def test_valid(typed: str, registry: str, repository: str, tag: str | None, digest: str | None) -> None:
    ref = parse_reference(typed)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)
    # the canonical form parses to the same reference
    assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize("typed,why", INVALID)
def test_invalid(typed: str, why: str) -> None:
    with pytest.raises(InvalidReference) as err:
        parse_reference(typed)
    assert why in str(err.value)
    if typed.strip():
        assert repr(typed) in str(err.value) or typed in str(err.value)


def test_canonical_form_and_helpers() -> None:
    ref = parse_reference("ubuntu")
    assert str(ref) == "docker.io/library/ubuntu:latest"
    assert ref.api_host == "registry-1.docker.io"
    assert ref.manifest_reference == "latest"
    pinned = ref.with_digest(D)
    assert str(pinned) == f"docker.io/library/ubuntu:latest@{D}" and pinned.manifest_reference == D
    assert parse_reference("127.0.0.1:5000/x").api_host == "127.0.0.1:5000"
    assert parse_reference("127.0.0.1:5000/x").name == "127.0.0.1:5000/x"


_component = st.from_regex(r"[a-z0-9]{1,6}(?:(?:[._]|__|-{1,2})[a-z0-9]{1,6}){0,2}", fullmatch=True)
_domain = st.one_of(
    st.just("docker.io"),
    st.from_regex(r"[a-z0-9]{1,8}(?:\.[a-z0-9]{1,8}){1,2}(?::[0-9]{1,5})?", fullmatch=True),
    st.from_regex(r"localhost(?::[0-9]{1,5})?", fullmatch=True),
)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_digest = st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True)


@given(domain=_domain, path=st.lists(_component, min_size=1, max_size=4),
       tag=st.one_of(st.none(), _tag), digest=st.one_of(st.none(), _digest))
def test_round_trip(domain: str, path: list[str], tag: str | None, digest: str | None) -> None:
    repository = "/".join(path)
    if domain == "docker.io" and len(path) == 1:
        repository = f"library/{repository}"
    ref = Reference(domain, repository, tag if tag or digest else "latest", digest)
    assert parse_reference(str(ref)) == ref
    assert str(parse_reference(str(ref))) == str(ref)
