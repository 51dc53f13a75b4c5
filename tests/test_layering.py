"""The architecture as a test: imports only go down the floors, and files stay readable in size.

Floors (design.md): formats (quant) < kernels < ops < modules (lora) < model and loading <
optimizers, data, training, export, generation < CLI. `config` is a leaf every floor may read
(it imports nothing from qlora); `precision` (dtypes by name, compute dtype auto) sits beside it.
The model knows nothing about quantization or LoRA.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qlora"

FLOOR = {
    "config": 0,
    "precision": 0,
    "quant": 1,
    "kernels": 2,
    "ops": 3,
    "lora": 4,
    "model": 5,
    "checkpoint_io": 5,
    "tokenizer": 5,
    "loading": 5,
    "fused": 5,
    "data": 6,
    "optim": 6,
    "adapter": 5,
    "generate": 6,
    "export": 7,
    "train": 6,
    "demo": 7,
    "eval": 7,
    "cli_args": 7,
    "cli": 8,
    "__init__": 8,
}
MODEL_MUST_NOT_IMPORT = {"quant", "kernels", "ops", "lora", "loading"}
# A soft target is 400 lines (style-anchors principle 2); this is the hard ceiling CI enforces.
MAX_LINES = 800


def top_level(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def qlora_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qlora":
            parts = node.module.split(".")
            found.add(parts[1] if len(parts) > 1 else node.names[0].name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "qlora" and len(parts) > 1:
                    found.add(parts[1])
    return found


def python_files():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_floor():
    unknown = {top_level(p) for p in python_files()} - set(FLOOR)
    assert not unknown, f"add these to FLOOR in tests/test_layering.py: {sorted(unknown)}"


def test_imports_only_go_down():
    upward = []
    for path in python_files():
        me = top_level(path)
        for imported in qlora_imports(path):
            if imported != me and FLOOR.get(imported, 99) > FLOOR[me]:
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports qlora.{imported}")
    assert not upward, "\n".join(upward)


def test_model_is_quantization_agnostic_and_config_is_a_leaf():
    for path in (PACKAGE / "model").rglob("*.py"):
        assert not qlora_imports(path) & MODEL_MUST_NOT_IMPORT, path
        assert "triton" not in path.read_text(encoding="utf-8"), path
    for path in (PACKAGE / "config").rglob("*.py"):
        assert qlora_imports(path) <= {"config"}, path
    assert qlora_imports(PACKAGE / "precision.py") <= {"config"}


def test_quant_floor_imports_only_torch():
    for path in (PACKAGE / "quant").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert roots <= {"torch", "qlora", "__future__", "functools", "struct", "json", "dataclasses",
                         "collections"}, (path, roots)  # fmt: skip


def test_files_stay_readable_in_size():
    too_long = [f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p in python_files()
                if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]  # fmt: skip
    assert not too_long, too_long
