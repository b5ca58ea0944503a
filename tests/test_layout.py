"""The package tree is the data flow: each stage imports only the stages before it.

Read from the source (no import runs), so a new arrow that runs back up fails here
before it can make a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The import order (see prewarm/__init__.py): a package may import those before it.
ORDER = ["errors", "config", "imagebuild", "resolve", "index", "store", "fleet", "runtime", "node", "cli"]
#: Modules every stage may use.
SIDEWAYS = {"errors", "config"}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "workers":
        return "workers"
    if parts[0] != "prewarm":
        return None
    if len(parts) == 1:
        return "prewarm"
    return parts[1]


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out: list[tuple[int, str]] = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base == "prewarm":  # from prewarm import x: the stage is x
                out += [(node.lineno, f"prewarm.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, base))
    return out


def _modules() -> list[tuple[Path, str]]:
    found = []
    for top in ("prewarm", "workers"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if "_proto" in path.parts:
                continue
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            found.append((path, ".".join(parts)))
    return found


def _allowed(src: str, dst: str) -> bool:
    if dst == "prewarm" or src == dst or dst in SIDEWAYS:
        return True
    if src == "__main__":  # python -m prewarm runs the CLI
        return dst == "cli"
    if src == "cli" and dst == "workers":  # prewarm worker starts the Celery adapter
        return True
    if dst in ("cli", "workers"):  # the library never reaches up into its adapters
        return False
    if src in ("workers", "prewarm"):
        return True
    if src not in ORDER or dst not in ORDER:
        return False
    return ORDER.index(dst) < ORDER.index(src)


def test_every_module_lives_in_a_stage_package() -> None:
    loose = [m for p, m in _modules()
             if m.count(".") == 1 and m.startswith("prewarm.") and _stage(m) not in ORDER + ["__main__"]]
    assert loose == [], f"modules outside the stage packages: {loose}"


def test_imports_run_from_later_stages_to_earlier_ones() -> None:
    wrong = []
    for path, module in _modules():
        src = _stage(module)
        for line, target in _imports(path, module):
            dst = _stage(target)
            if dst is None or src is None:
                continue
            if not _allowed(src, dst):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {src} imports {target}")
    assert wrong == [], "imports that run back up the flow:\n" + "\n".join(wrong)


@pytest.mark.parametrize("src,dst,ok", [
    ("store", "index", True), ("index", "store", False), ("node", "cli", False),
    ("runtime", "fleet", True), ("fleet", "runtime", False), ("workers", "node", True),
    ("cli", "workers", True), ("node", "workers", False), ("__main__", "cli", True), ("workers", "cli", False),
])
def test_the_rule_itself(src: str, dst: str, ok: bool) -> None:
    assert _allowed(src, dst) is ok
