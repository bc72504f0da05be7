"""The contracts between the parts: the Stream and Objective interfaces, and the import layering.

Fast (no training): the stream classes implement `BatchStream`, an `Objective` needs only `forward`, the trainer
reaches the stream and the objective only through those interfaces (no getattr/hasattr probing), and no import
cycle exists in `pretrain/`, between modules or between areas (function-level imports included).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

from pretrain.data.cursor import BatchStream
from pretrain.objectives.base import Objective

PKG = Path(__file__).resolve().parents[1] / "pretrain"


def stream_classes():
    from pretrain.data.ray_reader import RayStream
    from pretrain.data.stream import Stream
    from pretrain.data.synthetic import SyntheticStream
    from pretrain.launch.ray_worker import RankStream

    return [Stream, RayStream, SyntheticStream, RankStream]


@pytest.mark.parametrize("cls", stream_classes(), ids=lambda c: c.__name__)
def test_every_stream_class_implements_the_protocol(cls):
    members = [
        n for n in ("batch_size", "image_size", "state_dict", "load_state_dict", "counters", "info", "close")
    ]
    annotated = {n for klass in cls.__mro__ for n in getattr(klass, "__annotations__", {})}
    missing = [n for n in members if not hasattr(cls, n) and n not in annotated]
    assert not missing, f"{cls.__name__} lacks {missing}"
    assert hasattr(cls, "__iter__")


def test_synthetic_stream_is_a_batch_stream_and_resumes():
    from pretrain.data.synthetic import SyntheticStream

    s = SyntheticStream(4, 16, 3, seed=1)
    assert isinstance(s, BatchStream)
    assert (s.batch_size, s.image_size) == (4, 16)
    next(iter(s))
    state = s.state_dict()
    a = next(iter(s))["image"]
    again = SyntheticStream(4, 16, 3, seed=1)
    again.load_state_dict(state)
    assert torch.equal(next(iter(again))["image"], a)


def test_objective_needs_forward_and_has_default_hooks():
    class NoForward(Objective):
        pass

    with pytest.raises(TypeError, match="forward"):
        NoForward()

    class Minimal(Objective):
        def forward(self, batch):
            return {"loss": torch.zeros(())}

    obj = Minimal()
    assert obj.evaluate([{}]) == {}
    assert obj.rank_state() == {} and obj.load_rank_state({}) is None
    assert obj.frozen_module_names() == ()
    obj.on_step_end(1, 10)


def _probing_calls(path: Path, names: tuple[str, ...]) -> list[str]:
    """getattr/hasattr calls whose first argument is one of `names` (e.g. `self.stream`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
        ):
            target = ast.unparse(node.args[0]) if node.args else ""
            if any(target == n or target.startswith(n + ".") for n in names):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_trainer_calls_stream_and_objective_through_their_interfaces():
    trainer = PKG / "engine" / "trainer.py"
    names = ("self.stream", "self.objective", "self.engine.module", "stream", "objective")
    assert _probing_calls(trainer, names) == []
    assert _probing_calls(PKG / "engine" / "streams.py", names) == []
    assert _probing_calls(PKG / "objectives" / "evaluation.py", names) == []


# ------------------------------------------------------------------------------------------ import layering
def import_graph() -> dict[str, set[str]]:
    """module -> pretrain modules it imports anywhere in its file (function-level imports included)."""
    mods: dict[str, tuple[Path, bool]] = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name

    graph: dict[str, set[str]] = {}
    for mod, (path, is_pkg) in mods.items():
        package = mod if is_pkg else mod.rsplit(".", 1)[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out.update(resolve(a.name) for a in node.names if a.name.startswith("pretrain"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(
                        parts[: len(parts) - node.level + 1] + ([node.module] if node.module else [])
                    )
                if base.startswith("pretrain"):
                    out.update(
                        resolve(f"{base}.{a.name}") if f"{base}.{a.name}" in mods else resolve(base)
                        for a in node.names
                    )
        out.discard(mod)
        out.discard("")
        graph[mod] = out
    return graph


def area(mod: str, graph: dict) -> str:
    """The layer a module belongs to: a sub-package (pretrain.engine, ...), a top-level module (pretrain.config,
    pretrain.parallel), or the command line (cli.py and every area's commands.py, which sit above everything)."""
    if mod == "pretrain.cli" or mod.endswith(".commands"):
        return "cli"
    parts = mod.split(".")
    if len(parts) == 2 and f"{mod}.__init__" not in graph and not any(m.startswith(mod + ".") for m in graph):
        return mod
    return ".".join(parts[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules():
    assert cycles(import_graph()) == []


def test_no_import_cycle_between_areas():
    graph = import_graph()
    areas: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        a = area(mod, graph)
        areas.setdefault(a, set()).update(area(t, graph) for t in targets if area(t, graph) != a)
    found = cycles(areas)
    detail = [
        f"{m} -> {t}"
        for comp in found
        for m, ts in graph.items()
        for t in ts
        if area(m, graph) in comp and area(t, graph) in comp and area(m, graph) != area(t, graph)
    ]
    assert found == [], "\n".join(detail)


def test_objectives_do_not_import_the_engine():
    graph = import_graph()
    bad = [
        f"{m} -> {t}"
        for m, ts in graph.items()
        if m.startswith("pretrain.objectives.") and not m.endswith(".commands")
        for t in ts
        if t.startswith("pretrain.engine")
    ]
    assert bad == []


def test_import_graph_sees_function_level_imports():
    # the check would be blind if it missed imports inside functions (most of the project's are there)
    graph = import_graph()
    src = inspect.getsource(__import__("pretrain.engine.build", fromlist=["x"]))
    assert "from pretrain.models import" in src
    assert "pretrain.models" in graph["pretrain.engine.build"]  # imported inside build_model
