"""containerd's filter syntax for ``List``/``Walk``, parsed once and matched against :class:`Info`.

containerd sends filters as strings, and its unpacker relies on them to find the
snapshot we committed for a pre-warmed layer
(``labels."containerd.io/snapshot.ref"==<chain id>,parent=="<parent>"``), so this is
part of the remote-snapshot handshake, not a nicety.  The grammar (containerd
``filters/parser.go``)::

    filter    := selector ("," selector)*          all selectors must hold
    selector  := fieldpath [operator value]        no operator: the field is present
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="
    value     := quoted | [^,\\s]+
    quoted    := '"' ... '"'  (backslash escapes)  |  '/' ... '/' (for ~=)

Several filters are alternatives: a snapshot matches when any one of them does.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from prewarm.errors import InvalidSnapshotRequest
from prewarm.runtime.snapshot.snapshotter import Info

_FIELD_RE = re.compile(r"[A-Za-z0-9_]+")
_OPERATORS = ("==", "!=", "~=")


@dataclasses.dataclass(frozen=True)
class Selector:
    """One ``fieldpath op value`` test; ``operator`` is empty for a presence test."""

    fieldpath: tuple[str, ...]
    operator: str = ""
    value: str = ""

    def matches(self, info: Info) -> bool:
        """Apply containerd's semantics: ``!=`` holds for an absent field unless value is empty."""
        value, present = field_of(info, self.fieldpath)
        if self.operator == "":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        return present and re.search(self.value, value) is not None


Filter = tuple[Selector, ...]


def field_of(info: Info, fieldpath: tuple[str, ...]) -> tuple[str, bool]:
    """The value of a field path on ``info`` and whether it is present (containerd's adaptor).

    ``name`` and ``parent`` are always present, even empty: containerd's unpacker finds a
    base layer with ``parent==""``.
    """
    head, rest = fieldpath[0], fieldpath[1:]
    if head == "name" and not rest:
        return info.name, True
    if head == "parent" and not rest:
        return info.parent, True
    if head == "kind" and not rest:
        return info.kind.label, True
    if head == "labels" and rest:
        key = ".".join(rest)
        return info.labels.get(key, ""), key in info.labels
    return "", False


class _Scanner:
    """A cursor over one filter string; every error names the filter and the position."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> InvalidSnapshotRequest:
        return InvalidSnapshotRequest(
            f"snapshot filter {self.text!r}: {what} at position {self.pos}; expected containerd's "
            "syntax, e.g. kind==active,labels.\"containerd.io/gc.root\""
        )

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def at_end(self) -> bool:
        self.skip_space()
        return self.pos >= len(self.text)

    def peek(self, token: str) -> bool:
        self.skip_space()
        return self.text.startswith(token, self.pos)

    def quoted(self, close: str) -> str:
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == "\\" and self.pos + 1 < len(self.text):
                out.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            if ch == close:
                self.pos += 1
                return "".join(out)
            out.append(ch)
            self.pos += 1
        raise self.fail(f"unterminated {close}-quoted string")

    def field(self) -> str:
        self.skip_space()
        if self.peek('"'):
            return self.quoted('"')
        m = _FIELD_RE.match(self.text, self.pos)
        if not m:
            raise self.fail("a field name is missing")
        self.pos = m.end()
        return m.group(0)

    def value(self) -> str:
        self.skip_space()
        if self.peek('"'):
            return self.quoted('"')
        if self.peek("/"):
            return self.quoted("/")
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] != "," and not self.text[self.pos].isspace():
            self.pos += 1
        if self.pos == start:
            raise self.fail("a value is missing")
        return self.text[start:self.pos]


def parse_filter(text: str) -> Filter:
    """Parse one filter string into its selectors (all of which must hold).

    Raises:
        InvalidSnapshotRequest: the string is not containerd's filter syntax.
    """
    scanner = _Scanner(text)
    selectors: list[Selector] = []
    while True:
        path = [scanner.field()]
        while scanner.peek("."):
            scanner.pos += 1
            path.append(scanner.field())
        operator = next((op for op in _OPERATORS if scanner.peek(op)), "")
        value = ""
        if operator:
            scanner.pos += len(operator)
            value = scanner.value()
            if operator == "~=":
                try:
                    re.compile(value)
                except re.error as err:
                    raise scanner.fail(f"bad regular expression {value!r} ({err})") from None
        selectors.append(Selector(tuple(path), operator, value))
        if scanner.at_end():
            return tuple(selectors)
        if not scanner.peek(","):
            raise scanner.fail("expected ',' or the end")
        scanner.pos += 1


def parse_filters(texts: Sequence[str]) -> list[Filter]:
    """Parse every filter; empty strings are ignored, as containerd does.

    Raises:
        InvalidSnapshotRequest: any filter does not parse.
    """
    return [parse_filter(text) for text in texts if text.strip()]


def matches_any(filters: Sequence[Filter], info: Info) -> bool:
    """True when no filters are given or when all selectors of at least one filter hold."""
    if not filters:
        return True
    return any(all(sel.matches(info) for sel in flt) for flt in filters)
