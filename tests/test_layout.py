"""The package's layers (issue 23, README "Layout"): the algorithms under `jraise/select/` and
`jraise/grads/` neither import `jraise.model` nor touch files; no module imports another's
`_private` names; module-level imports form no cycle. Read from the source (ast), so a violation
is named by file and line."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jraise"
PURE = (PACKAGE / "select", PACKAGE / "grads")
# Calls that read or write files; the pure layers take arrays and callables instead.
FILE_CALLS = {"open", "read_text", "write_text", "read_bytes", "write_bytes", "load", "save", "savez", "mkdir",
              "atomic_write_text", "atomic_write_bytes", "atomic_write_jsonl", "atomic_write_group"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def _imports(tree: ast.AST, module: str, is_package: bool):
    """(line, imported module, names) of every import in ``tree``, relative ones resolved."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".") if is_package else module.split(".")[:-1]
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            yield node.lineno, base, tuple(alias.name for alias in node.names)


def test_pure_layers_neither_import_the_model_nor_touch_files():
    problems = []
    for directory in PURE:
        for path in sorted(directory.rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            module = _module_name(path)
            for line, imported, names in _imports(tree, module, path.name == "__init__.py"):
                targets = [imported] + [f"{imported}.{n}" for n in names]
                if any(t == "jraise.model" or t.startswith("jraise.model.") for t in targets):
                    problems.append(f"{path.relative_to(ROOT)}:{line}: imports {imported}")
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                    if name in FILE_CALLS:
                        problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: calls {name}()")
    assert not problems, "\n".join(problems)


def test_importing_the_pure_layers_loads_no_model_code():
    code = ("import sys, jraise.select, jraise.grads; "
            "print(sorted(m for m in sys.modules if m.startswith(('jraise.model', 'jraise.jobs', 'jraise.testbed'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_module_imports_another_modules_private_names():
    problems = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for line, imported, names in _imports(tree, _module_name(path), path.name == "__init__.py"):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if imported.startswith("jraise") and private:
                problems.append(f"{path.relative_to(ROOT)}:{line}: from {imported} import {', '.join(private)}")
    assert not problems, "\n".join(problems)


def test_module_level_imports_form_no_cycle():
    modules = {_module_name(p): p for p in _sources()}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        for line, imported, names in _imports(ast.Module(body=top, type_ignores=[]), module,
                                              path.name == "__init__.py"):
            for target in [imported] + [f"{imported}.{n}" for n in names]:
                if target in modules and target != module and not module.startswith(target + "."):
                    edges[module].add(target)  # a package's own submodules importing it are not a cycle
    # Tarjan's strongly connected components.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


# README "Layout": the floors, bottom up; a module may import from its own floor and those below.
FLOORS = {
    "jraise.errors": 1, "jraise.atomic": 1, "jraise.lock": 1, "jraise.parallel": 1, "jraise.compile_cache": 1,
    "jraise.loglik": 1,
    "jraise.model": 2,
    "jraise.data": 3,
    "jraise.train": 4, "jraise.eval": 4,
    "jraise.grads": 5, "jraise.select": 5,
    "jraise.testbed": 6, "jraise.fetch": 6, "jraise.real_pool": 6,
    "jraise.jobs": 7,
    "jraise.study_common": 8, "jraise.study_beyond_iid": 8, "jraise.study": 8, "jraise.study_real": 8,
    "jraise.demo": 8, "jraise.beyond_iid_study": 8,
    "jraise.cli": 9, "jraise.paper_configs": 9,
}


def _floor(module: str) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOORS:
            return FLOORS[".".join(parts[:n])]
    return None


def test_every_module_has_a_floor_and_imports_only_from_its_floor_or_below():
    problems = []
    for path in _sources():
        module = _module_name(path)
        if module == "jraise":
            continue  # the package's own __init__
        floor = _floor(module)
        if floor is None:
            problems.append(f"{path.relative_to(ROOT)}: on no floor of README's Layout (add it to FLOORS)")
            continue
        tree = ast.parse(path.read_text(), str(path))
        for line, imported, names in _imports(tree, module, path.name == "__init__.py"):  # function-level too
            targets = [imported] + [f"{imported}.{n}" for n in names]
            above = {t: _floor(t) for t in targets if t.startswith("jraise.") and (_floor(t) or 0) > floor}
            for target, its_floor in above.items():
                problems.append(f"{path.relative_to(ROOT)}:{line}: floor {floor} imports {target} (floor {its_floor})")
    assert not problems, "\n".join(problems)
