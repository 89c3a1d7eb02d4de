"""The package's layers import only downward: core (math, torch only) -> layouts -> optim ->
integrations -> train -> tools. A module importing a later layer fails here, naming both."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "galore_ds"
LAYERS = ["core", "layouts", "optim", "integrations", "train", "tools"]
# optim/ modules that serve every rule (the rest are the public constructors, one per rule)
STEP_MODULES = ["__init__.py", "step.py", "refresh.py", "entry.py", "layerwise.py", "lowrank_ddp.py"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "galore_ds" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def test_every_module_belongs_to_a_layer():
    stray = [p.relative_to(PKG) for p in PKG.rglob("*.py")
             if p.parent != PKG and p.relative_to(PKG).parts[0] not in LAYERS]
    assert not stray, stray
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert top == ["__init__.py"], top  # the package facade only


def test_imports_only_go_down():
    wrong = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        if len(rel.parts) < 2:
            continue
        mine = LAYERS.index(rel.parts[0])
        for module in _imports(path):
            layer = _layer(module)
            if layer is not None and LAYERS.index(layer) > mine:
                wrong.append(f"{rel} imports {module} ({layer} is above {rel.parts[0]})")
            if module == "galore_ds" and mine < LAYERS.index("optim"):
                wrong.append(f"{rel} imports the package facade galore_ds (it imports every layer)")
    assert not wrong, "\n".join(wrong)


def test_core_is_math_only():
    """core imports torch, never torch.distributed."""
    for path in (PKG / "core").rglob("*.py"):
        assert not any(m.startswith("torch.distributed") for m in _imports(path)), path


def test_layouts_know_a_rule_by_its_declarations_not_its_class():
    """layouts/ (the ZeRO binding among them) and optim/ (the step, refresh, per-layer
    wrapper, DDP hook and the checkpoint formats) read a rule's declarations (core/rule.py:
    whole_rows, quantized, state_shapes) and never compare a class or type name: a new rule
    then needs no change there (its constructor in optim/ names it, which is its job)."""
    found = []
    constructors = set((PKG / "optim").glob("*.py")) - {PKG / "optim" / f for f in STEP_MODULES}
    for path in sorted(p for layer in ("layouts", "optim") for p in (PKG / layer).rglob("*.py")
                       if p not in constructors):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(isinstance(s, ast.Attribute) and s.attr == "__name__" for s in sides):
                    found.append(f"{path.name}:{node.lineno} compares a __name__")
            if isinstance(node, ast.Name) and node.id.endswith("Rule") and node.id not in ("UpdateRule", "QuantizedRule"):
                found.append(f"{path.name}:{node.lineno} names the rule class {node.id}")
    assert found == []


def test_no_layer_above_core_names_a_rules_state_keys():
    """Where each rule's state tensors lie (state_layout) and its quantized form (code_keys,
    scale_keys) are the rule's declarations: the step, the per-layer wrapper, the checkpoint
    formats and the layouts name none of those keys (docstrings aside)."""
    from galore_ds.core.adafactor import AdafactorRule
    from galore_ds.core.adamw import AdamWRule
    from galore_ds.core.adamw8bit import AdamW8bitRule
    from galore_ds.core.apollo import ApolloRule
    from galore_ds.core.fira import FiraRule

    rules = [AdamWRule, AdamW8bitRule, AdafactorRule, FiraRule, ApolloRule]
    keys = {k for r in rules for k in r.state_layout} | {
        k for r in rules if r.quantized for k in (*r.code_keys, *r.scale_keys)}
    assert {"exp_avg", "exp_avg_sq_row", "state1"} <= keys   # the scan looks for real keys
    constructors = set((PKG / "optim").glob("*.py")) - {PKG / "optim" / f for f in STEP_MODULES}
    found = []
    for path in sorted(p for layer in ("layouts", "optim") for p in (PKG / layer).rglob("*.py")
                       if p not in constructors):
        tree = ast.parse(path.read_text())
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in keys and id(node) not in docstrings:
                found.append(f"{path.relative_to(PKG)}:{node.lineno} names the state key {node.value!r}")
    assert found == []
