"""The package layers of the README's Architecture table hold: no module imports a layer above its own,
and no import cycles between modules. Every `import` in jaxedit/ is read (function-level ones too)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxedit"
ENTRY_POINTS = ("__main__", "predict")  # command lines: may import anything, imported by nothing


def _layers() -> dict[str, int]:
    """Top-level module or package name -> layer number, from the README's Architecture table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    out = {}
    for number, names in re.findall(r"^\| (\d+) \| ([^|]+) \|", section, flags=re.M):
        for name in re.findall(r"`([\w.]+)`", names):
            out[name.removeprefix("jaxedit.").removesuffix("/")] = int(number)
    return out


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Modules of jaxedit that `path` imports (`from jaxedit.x import y` counts jaxedit.x.y when it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "jaxedit"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxedit":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _exists(f"{node.module}.{a.name}")}
    return found


def _exists(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_entry(module: str) -> bool:
    return module.split(".")[-1] in ENTRY_POINTS


def test_every_module_has_a_layer_and_imports_none_above_it():
    layers = _layers()
    assert {"models", "localize", "experiment", "sweep"} <= set(layers), layers
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        module = _module(path)
        if _is_entry(module):
            continue
        top = _top(module)
        assert top in layers, f"{module}: add {top!r} to the README's Architecture table"
        for target in _imports(path):
            assert not _is_entry(target), f"{module} imports the command line {target}"
            if layers[_top(target)] > layers[top]:
                wrong.append(f"{module} (layer {layers[top]}) imports {target} (layer {layers[_top(target)]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = {_module(p): {t for t in _imports(p) if _exists(t)} for p in PACKAGE.rglob("*.py")}
    graph = {m: {t for t in targets if t != m and not m.startswith(t + ".")} for m, targets in graph.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The walk finds a function-level import (the kind a layer violation hides in)."""
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from jaxedit.sweep import runner\n")
    assert "jaxedit.sweep.runner" in _imports(path)


def test_sweep_settings_declare_no_mirror_of_a_library_settings_class():
    """A dataclass under jaxedit/sweep/ declares (in its own body) fewer than 4 field names of a library settings class."""
    import dataclasses
    import importlib
    import inspect

    def classes(modules):
        for name in modules:
            for _, cls in inspect.getmembers(importlib.import_module(name), inspect.isclass):
                if dataclasses.is_dataclass(cls) and cls.__module__ == name:
                    yield cls

    sweep = [_module(p) for p in (PACKAGE / "sweep").glob("*.py") if not _is_entry(_module(p))]
    library = [_module(p) for p in PACKAGE.rglob("*.py") if "sweep" not in p.parts and not _is_entry(_module(p))]
    settings = [c for c in classes(library) if c.__name__.endswith(("Settings", "Spec"))]
    assert len(settings) >= 8, [c.__name__ for c in settings]
    for cls in classes(sweep):
        own = set(cls.__dict__.get("__annotations__", {}))
        for lib in settings:
            shared = own & {f.name for f in dataclasses.fields(lib)}
            assert len(shared) < 4, f"{cls.__name__} mirrors {lib.__name__}: {sorted(shared)}"
