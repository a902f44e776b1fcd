"""Imports flow one way (DESIGN.md section 1): checked on the source, not by convention."""

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[1] / "cbm_lm"

# package -> packages it must never import
FORBIDDEN = {
    "parallel": ("cbm_lm.model", "cbm_lm.train", "cbm_lm.data", "cbm_lm.objectives"),
    "model": ("cbm_lm.train", "cbm_lm.data", "cbm_lm.objectives"),
    "objectives": ("cbm_lm.train",),
    "attribution": ("cbm_lm.train",),
    # the eval binary restores params only (train/checkpoint.py), never the training loop
    "eval": ("cbm_lm.train.loop", "cbm_lm.train.step", "cbm_lm.train.state",
             "cbm_lm.train.checkpointer", "cbm_lm.train.losses"),
}


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_no_import_runs_against_the_flow():
    bad = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((PKG / package).glob("*.py")):
            for module in _imports(path):
                if module.startswith(forbidden):
                    bad.append(f"{path.relative_to(PKG.parent)} imports {module}")
    assert not bad, "\n".join(bad)


def test_library_never_imports_its_binaries_or_benchmarks():
    bad = [f"{p.relative_to(PKG.parent)} imports {m}" for p in sorted(PKG.rglob("*.py"))
           for m in _imports(p) if m.split(".")[0] in ("tools", "launch", "benchmarks")]
    tests = PKG.parent / "tests"
    bad += [f"{p.relative_to(PKG.parent)} imports {m}" for p in sorted(tests.glob("*.py"))
            for m in _imports(p) if m.split(".")[0] == "benchmarks"]
    assert not bad, "\n".join(bad)


def _module_level_imports(path):
    """Modules imported by the module's own top-level statements (not inside functions,
    where a deferred import is the usual way to break a cycle)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def _module_name(path):
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_level_import_cycle():
    """A cycle makes the import order matter: `import cbm_lm.config_validation` before
    `cbm_lm.config` once failed with a partially initialized module."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {m: sorted({i for i in _module_level_imports(p) if i in modules and i != m})
             for m, p in modules.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in graph[m]:
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)
