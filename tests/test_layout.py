"""The house rules of the code layout (DESIGN.md's Rooms table), checked on the source so they cannot rot:

* a room imports only rooms on lower floors (earlier in ``FLOORS``) or itself; the toy world (``synthetic``) is a
  leaf that any room may import lazily, inside a function, for the toy specs (``treg:tiny``, ``treg:toy``,
  ``rule:toy``, the oracle scorer), and that imports no room but ``files``;
* no two files import each other;
* no function is longer than 80 lines, and the trainer stays TRL glue (≤ 300 lines).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "treg"
# Lowest floor first. Modules outside DESIGN.md's table sit with the room they serve: viz and quickstart are
# commands (they build a trainer), so they live just below the command line; packing is the scoring engine's packed
# twin (ids in, per-token log-probs out, for the token-reward pass and the trainer's forward) and needs no room but
# torch, so it sits right above scoring. mixtures reads several datasets through data; compat (other trainers'
# recipe keys) reads mappings only and serves recipes.
FLOORS = (
    "losses", "files", "models", "scoring", "packing", "generation", "data", "mixtures", "token_rewards", "feedback",
    "evaluation", "synthetic", "compat", "recipes", "trainer", "rl", "viz", "quickstart", "cli", "__main__",
)
LEAF = "synthetic"
MAX_FUNCTION_LINES = 80
MAX_TRAINER_LINES = 300


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported treg module, lazy)`` for every import of a treg module in ``path``; lazy = inside a function."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names if a.name.split(".")[0] == "treg")
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "treg":
                for alias in child.names:  # `from treg.token_rewards import cache` imports a module
                    sub = f"{child.module}.{alias.name}"
                    is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").is_file()
                    found.append((sub if is_module else child.module, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {_module_name(p): _imports(p) for p in SOURCES}


def test_every_room_is_on_a_floor():
    rooms = {_room(m) for m in GRAPH} - {"__init__"}
    missing = rooms - set(FLOORS)
    assert not missing, f"rooms missing from FLOORS (add them where DESIGN.md puts them): {missing}"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_only(module):
    room = _room(module)
    for target, lazy in GRAPH[module]:
        other = _room(target)
        if other in (room, "__init__"):
            continue
        if room == LEAF:
            assert other == "files", f"{module} imports {target}: the toy world is a leaf (only treg.files)"
            continue
        if other == LEAF:
            assert lazy or room in ("quickstart",), f"{module} imports {target} at module level; import it lazily"
            continue
        assert FLOORS.index(other) < FLOORS.index(room), (
            f"{module} (room {room!r}) imports {target} (room {other!r}), which is on a higher floor"
        )


def test_no_two_files_import_each_other():
    edges = {(m, t) for m, targets in GRAPH.items() for t, _ in targets if t != m}
    circles = sorted((a, b) for a, b in edges if (b, a) in edges and a < b)
    assert not circles, f"files that import each other: {circles}"


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "split these where the split names a real step:\n" + "\n".join(long)


def test_the_trainer_stays_trl_glue():
    lines = len((PACKAGE / "trainer.py").read_text().splitlines())
    assert lines <= MAX_TRAINER_LINES, f"treg/trainer.py has {lines} lines; the token-reward pass lives elsewhere"
