#!/usr/bin/env python3
"""Checks that module dependencies in src/ point one way (see docs/architecture.md, "The tree,
by layer"): reads every `crate::...` path outside test modules, fails on an import circle or on a
module importing a higher layer, or one feature importing another. Run by scripts/test.sh."""
import collections
import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
LAYERS = [
    ("base", ["domain", "config", "secret"]),
    ("core", ["pricing", "error_class", "telemetry", "store", "history", "kafka", "faults", "shutdown"]),
    ("feature", ["ingest", "alerting", "calibration", "usage"]),
    ("top", ["http", "daemon", "cli", "exit", "loadgen", "lib", "main", "test_support"]),
]
RANK = {m: i for i, (_, ms) in enumerate(LAYERS) for m in ms}


def modules():
    found = {}
    for root, _, files in os.walk(SRC):
        for f in files:
            if f.endswith(".rs"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, SRC)[:-3].replace(os.sep, "::")
                found[re.sub(r"::mod$", "", rel)] = path
    return found


def dependencies(mods):
    deps = collections.defaultdict(set)
    for name, path in mods.items():
        text = re.split(r"#\[cfg\(test\)\]\s*mod tests", open(path).read())[0]
        # Comments (doc links included) are no imports.
        text = "\n".join(line.split("//", 1)[0] for line in text.splitlines())
        paths = re.findall(r"crate::([a-z_]+(?:::[a-z_]+)*)", text)
        for group in re.findall(r"use crate::\{([^}]*)\}", text):
            paths += [p.strip() for p in group.split(",")]
        for p in paths:
            parts = p.split("::")
            for i in range(len(parts), 0, -1):
                target = "::".join(parts[:i])
                if target in mods:
                    if target != name and not name.startswith(target + "::"):
                        deps[name].add(target)
                    break
    return deps


def main():
    mods = modules()
    deps = dependencies(mods)
    problems = []
    for name in sorted(mods):
        top = name.split("::")[0]
        if top not in RANK:
            problems.append(f"{name}: not placed in a layer (scripts/check-layers.py LAYERS)")
            continue
        for target in sorted(deps[name]):
            other = target.split("::")[0]
            if other == top:
                continue
            if RANK[other] > RANK[top]:
                problems.append(f"{name} imports {target}, a higher layer")
            elif RANK[other] == RANK[top] == RANK["ingest"]:
                problems.append(f"{name} imports {target}: features do not import each other")
            elif RANK[other] == RANK[top] == 0 and top != "config":
                problems.append(f"{name} imports {target}: at the base only config imports (domain, secret)")
    # Circles, between modules and between folders.
    for graph in (deps, {a: {b.split("::")[0] for b in bs} for a, bs in _folders(deps).items()}):
        index, low, stack, on, counter = {}, {}, [], set(), [0]

        def visit(v):
            index[v] = low[v] = counter[0]
            counter[0] += 1
            stack.append(v)
            on.add(v)
            for w in graph.get(v, ()):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    problems.append("import circle: " + " -> ".join(sorted(component)))

        for v in list(graph):
            if v not in index:
                visit(v)
    if problems:
        print("layering problems:\n" + "\n".join("  - " + p for p in problems))
        return 1
    print(f"layers: {len(mods)} modules, no circles, every import points down")
    return 0


def _folders(deps):
    folders = collections.defaultdict(set)
    for a, bs in deps.items():
        for b in bs:
            fa, fb = a.split("::")[0], b.split("::")[0]
            if fa != fb:
                folders[fa].add(fb)
    return folders


if __name__ == "__main__":
    sys.setrecursionlimit(10000)
    sys.exit(main())
