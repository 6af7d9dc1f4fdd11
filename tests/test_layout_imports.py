"""The layout, read from the source: imports point down, nothing imports a cli module, no import cycles. Every
import counts, also inside a function; one under `if TYPE_CHECKING:` counts for the direction, not for cycles (it
never runs). Units: app.py, dialog, kernels, local_model, and each subpackage and top module of execfeedback."""

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEAVES = {"dialog", "kernels", "local_model"}
EF = "execfeedback."
# The one settings table: the page, LoopConfig and the eval command line all read it; it imports only the leaves.
SETTINGS = EF + "settings"
# What each unit may import besides itself; every arrow points down this list.
MAY_IMPORT = {
    "app": {EF + "workspace", SETTINGS, EF + "export", EF + "adapters", *LEAVES},
    EF + "__main__": set(),  # it imports the chosen command's cli module by name (importlib), no other
    EF + "workspace": {EF + "loop", EF + "traces", EF + "adapters", SETTINGS, *LEAVES},
    EF + "eval": {EF + "loop", EF + "traces", EF + "adapters", SETTINGS, *LEAVES},
    EF + "finetune": {EF + "export", EF + "adapters", EF + "traces", *LEAVES},
    EF + "loop": {EF + "traces", SETTINGS, *LEAVES},
    SETTINGS: LEAVES,
    EF + "export": {EF + "traces", *LEAVES},
    EF + "adapters": {EF + "traces", *LEAVES},
    EF + "traces": LEAVES,
    "execfeedback": set(),
    **{leaf: set() for leaf in LEAVES},
}


MODULES = {"app": ROOT / "app.py"} | {
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
    for top in ("execfeedback", *LEAVES) for p in (ROOT / top).rglob("*.py")}


def _ours(name: str) -> str | None:
    """The module of ours that an imported name lives in (None: not ours)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(imports that run, imports for type checkers only) of one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    runs, typing = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = {_ours(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            found = {_ours(f"{base}.{a.name}") for a in node.names}
        else:
            continue
        (typing if id(node) in typing_only else runs).update(found - {None, name})
    return runs, typing


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}
RUNS = {name: runs for name, (runs, _) in IMPORTS.items()}
EDGES = {name: runs | typing for name, (runs, typing) in IMPORTS.items()}


def _unit(module: str) -> str:
    if module == SETTINGS:
        return SETTINGS
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "execfeedback" else parts[0]


def _is_cli(module: str) -> bool:
    last = module.rpartition(".")[2]
    return last == "cli" or last.endswith("_cli")


def test_imports_point_down_and_never_at_a_command_line_module():
    wrong = [f"{a} imports {b}" + (" (a cli module)" if _is_cli(b) else f": {_unit(a)} may not import {_unit(b)}")
             for a, targets in EDGES.items() for b in sorted(targets)
             if _is_cli(b) or (_unit(a) != _unit(b) and _unit(b) not in MAY_IMPORT.get(_unit(a), ()))]
    assert not wrong, "\n".join(wrong)
    assert {_unit(m) for m in MODULES} <= MAY_IMPORT.keys(), "a new unit needs its line in MAY_IMPORT"


def test_no_cycle_between_modules_or_units():
    units: dict[str, set[str]] = {}
    for a, targets in RUNS.items():
        units.setdefault(_unit(a), set()).update(_unit(b) for b in targets if _unit(b) != _unit(a))
    for graph in (RUNS, units):
        try:
            TopologicalSorter(graph).prepare()
        except CycleError as e:
            raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None


def test_every_command_is_a_cli_module():
    tree = ast.parse(MODULES[EF + "__main__"].read_text(encoding="utf-8"))
    commands = next(ast.literal_eval(n.value) for n in ast.walk(tree)
                    if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "COMMANDS")
    assert {"export", "eval", "finetune", "adapter", "problems"} <= commands.keys()
    assert all(m in MODULES and _is_cli(m) for m in commands.values()), commands
