#!/usr/bin/env python3
"""Check the architecture's layout rules; exit 1 naming every breach.

- Crates (`cargo metadata`): supervisor -> {worker, scoreboard, query-core}; worker ->
  {query-core, scoreboard}; scoreboard and query-core depend on no other ferrocorn crate.
- query-core knows nothing of HTTP: no hyper, axum or http crate in its dependencies or sources.
- Inside the worker and query-core, the modules form a tree: no module imports (through a
  `crate::` path) from a module that imports it, directly or through others. A module's unit
  tests (`#[cfg(test)] mod tests` at the end of its file) are a child module and do not count.

Usage: scripts/check_layout.py            (run from anywhere in the repository)
"""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CRATES = {
    "ferrocorn": {"ferrocorn-worker", "ferrocorn-scoreboard", "ferrocorn-query-core"},
    "ferrocorn-worker": {"ferrocorn-query-core", "ferrocorn-scoreboard"},
    "ferrocorn-scoreboard": set(),
    "ferrocorn-query-core": set(),
}
HTTP_CRATES = {"hyper", "hyper-util", "axum", "http", "http-body-util", "tower"}


def crate_dependencies(problems):
    metadata = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--no-deps"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    for package in metadata["packages"]:
        name = package["name"]
        normal = {d["name"] for d in package["dependencies"] if d["kind"] is None}
        ours = {d for d in normal if d.startswith("ferrocorn")}
        if name not in CRATES:
            problems.append(f"unknown workspace crate {name}")
            continue
        if ours != CRATES[name]:
            problems.append(f"{name} depends on {sorted(ours)}, expected {sorted(CRATES[name])}")
        if name == "ferrocorn-query-core" and normal & HTTP_CRATES:
            problems.append(f"query-core depends on {sorted(normal & HTTP_CRATES)}")


def module_graph(src: Path):
    """Each module of the crate (by file stem) and the crate modules it names."""
    modules = {p.stem: p for p in src.glob("*.rs") if p.stem not in ("lib", "main")}
    graph = {}
    for name, path in modules.items():
        text = path.read_text()
        # A module's unit tests are a module of their own (at the end of the file, by convention).
        text = text.split("#[cfg(test)]\nmod tests", 1)[0]
        named = set()
        for match in re.finditer(r"\bcrate::([a-z_][a-z0-9_]*)", text):
            named.add(match.group(1))
        # `use crate::{a::X, b::Y}`
        for group in re.finditer(r"\buse crate::\{([^}]*)\}", text, re.S):
            for part in re.findall(r"([a-z_][a-z0-9_]*)::", group.group(1)):
                named.add(part)
        graph[name] = {m for m in named if m in modules and m != name}
    return graph


def cycles(graph):
    """The import cycles of `graph`, each as a list of modules."""
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def main():
    problems = []
    crate_dependencies(problems)
    core = ROOT / "crates/query-core/src"
    for path in core.rglob("*.rs"):
        for crate in ("hyper", "axum", "http"):
            if re.search(rf"\b{crate}::", path.read_text()):
                problems.append(f"query-core names {crate} in {path.relative_to(ROOT)}")
    for crate in ("worker", "query-core"):
        for cycle in cycles(module_graph(ROOT / f"crates/{crate}/src")):
            problems.append(f"{crate}: modules import each other: {' -> '.join(cycle)}")
    for problem in problems:
        print(f"check_layout: {problem}", file=sys.stderr)
    if not problems:
        print("check_layout: crates and modules form trees; query-core knows no HTTP")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
