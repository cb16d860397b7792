"""The layers of ARCHITECTURE.md, checked on the source: no import circle between our modules and no
import from a lower layer into a higher one (function-level imports count too), and no library module
importing an entry point. The table of model types that ``tokenizer/loading.py`` writes out (it may not
import the layers above it) matches the config classes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"tokenizer": "adatok_vlm.tokenizer", "generator": "adatok_vlm.generator", "adatok_vlm": "adatok_vlm",
           "training": "adatok_vlm.training"}
# Bottom to top; a module may import its own layer and the ones below it.
LAYERS = {"adatok_vlm.tokenizer": 0, "adatok_vlm.generator": 1, "adatok_vlm": 2, "adatok_vlm.training": 3}
# Entry points: command-line programs above every library layer. They may import anything; nothing imports them.
ENTRY_POINTS = {"adatok_vlm.cli", "adatok_vlm.sample_t2i", "adatok_vlm.sample_c2i", "adatok_vlm.training.demo",
                "adatok_vlm.training.demo_dit", "adatok_vlm.training.rehearse"}


def module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = FOLDERS[folder].split(".") + rest
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for folder in FOLDERS for p in sorted((ROOT / folder).glob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that ``name`` imports anywhere in its file (a ``from pkg import sub`` of a sub-module
    counts as importing that sub-module)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {t for t in found if t in known and t != name}


def layer(name: str) -> int:
    if name in ENTRY_POINTS:
        return len(LAYERS)
    return max(rank for prefix, rank in LAYERS.items() if name == prefix or name.startswith(prefix + "."))


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_goes_up_a_layer_or_into_an_entry_point(graph):
    wrong = [f"{a} -> {b}" for a, targets in graph.items() for b in sorted(targets)
             if (layer(b) > layer(a) and not a.endswith(".__init__") and a != "adatok_vlm")
             or (b in ENTRY_POINTS and a not in ENTRY_POINTS)]
    assert not wrong, "imports against ARCHITECTURE.md's layers:\n" + "\n".join(wrong)


def test_no_import_circle(graph):
    """Tarjan's strongly connected components over the import graph, package ``__init__`` files left out
    (a package re-exporting its children is not a circle)."""
    nodes = {n: {t for t in ts if modules()[t].name != "__init__.py"} for n, ts in graph.items()
             if modules()[n].name != "__init__.py"}
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in nodes.get(v, ()):
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
                circles.append(sorted(component))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_model_type_table_below_the_layers_matches_the_config_classes():
    from adatok_vlm import AdaTokConfig, AdaTokDiTConfig, AdaTokVLMConfig
    from adatok_vlm.tokenizer.loading import MODEL_CLASSES

    assert MODEL_CLASSES == {AdaTokConfig.model_type: "AdaTokModel", AdaTokDiTConfig.model_type: "AdaTokDiT",
                             AdaTokVLMConfig.model_type: "AdaTokVLMForCausalLM"}
