"""The architecture as a test: imports only go down the floors, no module-level import cycles,
device branches only where a device is chosen, cited files exist, and files stay readable in size.

Floors (design.md): formats (quant) < kernels < ops < modules (lora) < model and loading <
optimizers, data, training, export, generation < CLI. `config` is a leaf every floor may read
(it imports nothing from qlora); `precision` (dtypes by name, compute dtype auto) sits beside it.
The model knows nothing about quantization or LoRA.
"""

import ast
import io
import re
import textwrap
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "qlora"

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
    "distributed": 5,
    "generate": 6,
    "generation": 6,
    "export": 7,
    "train": 6,
    "demo": 7,
    "eval": 7,
    "serve": 7,
    "cli_args": 7,
    "cli": 8,
    "__init__": 8,
    "__main__": 8,
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
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from qlora import ops, lora / from qlora import quantize (a name of qlora/__init__.py)
                found |= {a.name if module_path(f"qlora.{a.name}") else "__init__" for a in node.names}
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


# ------------------------------------------------------------------ import cycles between modules
# Only module-level imports count: those that run while the module is imported (its body, class
# bodies, module-level `if`/`try`), `if TYPE_CHECKING:` blocks excluded. An import inside a
# function runs at call time, when every module involved has finished importing, so it cannot
# take part in an import-time cycle: it is allowed, and is how heavy optional dependencies (gguf,
# transformers) and the lazy `qlora.load*` entry points load. It is no licence to go up a floor:
# test_imports_only_go_down scans function-level imports too. Implicit imports of a parent
# package's __init__.py are not edges (every submodule would otherwise "cycle" with a package
# that re-exports it); an explicit `from qlora.lora import X` inside qlora/lora/ is.


def module_path(name: str, root: Path = REPO) -> Path | None:
    """The file of the dotted module `name` under `root`, or None."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, root: Path = REPO) -> str:
    rel = path.relative_to(root).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def module_level_imports(tree: ast.Module):
    """The import statements that run at import time (see above)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))


def imported_modules(path: Path, root: Path = REPO) -> set[str]:
    """The modules of `path`'s own top package that `path` imports at module level."""
    me = module_name(path, root)
    top = me.split(".")[0]
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in module_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            source = node.module or ""
            if node.level:  # from . import x / from ..y import z
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            # `from a import b`: b is a submodule of a, or a name defined in a's __init__.py
            targets = [f"{source}.{a.name}" if module_path(f"{source}.{a.name}", root) else source for a in node.names]
        found |= {t for t in targets if t.split(".")[0] == top and t != me and module_path(t, root)}
    return found


def import_cycles(package: Path) -> list[list[str]]:
    """Every set of modules of `package` that import one another in a circle (Tarjan's SCCs > 1)."""
    root = package.parent
    graph = {module_name(p, root): imported_modules(p, root) for p in sorted(package.rglob("*.py"))}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles_between_modules():
    cycles = import_cycles(PACKAGE)
    assert not cycles, "module-level import cycles (break them by moving the shared part down):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def test_import_cycle_finder_sees_a_cycle(tmp_path):
    """Negative control: a planted cycle is found; a function-level import does not make one."""
    files = {
        "pkg/__init__.py": "from pkg.a import A\n",
        "pkg/a.py": "from pkg.b import B\nA = 1\n",
        "pkg/b.py": "import pkg.c\nclass B:\n    from pkg import a\n",
        "pkg/c.py": "from . import d\n",
        "pkg/d.py": "def late():\n    from pkg import c\nif TYPE_CHECKING:\n    from pkg.c import x\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert import_cycles(tmp_path / "pkg") == [["pkg.a", "pkg.b"]]
    assert imported_modules(tmp_path / "pkg/c.py", tmp_path) == {"pkg.d"}


# ------------------------------------------------------ device branches above the dispatch floor
# design.md: "Nothing above this floor [ops] branches on x.is_cuda." Below it (quant, kernels,
# ops) choosing by device is the job. Above it, only code that chooses or manages a device itself
# may ask, each file listed here with its reason; anything else goes through qlora.ops.

DEVICE_BRANCHES_ALLOWED = {
    "qlora/precision.py": "resolves --device auto, and the compute dtype auto per device",
    "qlora/model/offload.py": "checkpointed activations to pinned host memory on a CUDA side stream",
    "qlora/optim/optimizer.py": "paged optimizer state: pages only CUDA parameters",
    "qlora/optim/in_backward.py": "pinned host rows and CUDA streams for the update in backward",
    "qlora/optim/report.py": "memory reporting: GPU, pinned and host bytes of the optimizer state",
    "qlora/train/cuda_graph.py": "CUDA graph capture needs a CUDA device",
    "qlora/train/step.py": "CUDA graphs on CUDA only; synchronize before reading the step's clock",
    "qlora/train/prepare.py": "activation offload (pinned memory, streams) on CUDA only",
    "qlora/train/metrics.py": "memory reporting: CUDA peak allocated, else resident memory",
    "qlora/train/trainer.py": "paged AdamW on CUDA; peak-memory logging; the GPU's memory for parallel auto",
    "qlora/train/memory_advice.py": "an out-of-memory message reports the GPU's capacity and peak",
    "qlora/distributed/runtime.py": "one GPU per process and NCCL on CUDA, gloo on CPUs",
    "qlora/generation/engine.py": "the decode step is replayed as a CUDA graph on CUDA only",
    "qlora/distributed/parallel.py": "DDP's device_ids are given for a CUDA device only",
}


def cuda_branches(source: str) -> list[tuple[int, str]]:
    """(line, expression) of each `.is_cuda` and each comparison of a `.type` with "cuda"."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr == "is_cuda":
            hits.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            typed = any(isinstance(o, ast.Attribute) and o.attr == "type" for o in operands)
            cuda = any(isinstance(c, ast.Constant) and c.value == "cuda" for o in operands for c in ast.walk(o))
            if typed and cuda:
                hits.append((node.lineno, ast.unparse(node)))
    return sorted(hits)


def test_nothing_above_the_dispatch_floor_branches_on_cuda():
    found = []
    for path in python_files():
        rel = path.relative_to(REPO).as_posix()
        if FLOOR[top_level(path)] <= FLOOR["ops"] or rel in DEVICE_BRANCHES_ALLOWED:
            continue
        found += [f"{rel}:{line}: {what}" for line, what in cuda_branches(path.read_text(encoding="utf-8"))]
    assert not found, (
        "device branches above qlora.ops (dispatch through qlora.ops, or add the file to "
        "DEVICE_BRANCHES_ALLOWED with the reason it chooses a device):\n" + "\n".join(found)
    )


def test_device_branch_allow_list_is_current():
    stale = [rel for rel in DEVICE_BRANCHES_ALLOWED
             if not (REPO / rel).is_file() or not cuda_branches((REPO / rel).read_text(encoding="utf-8"))]  # fmt: skip
    assert not stale, f"remove from DEVICE_BRANCHES_ALLOWED (gone, or no longer branches on CUDA): {stale}"


def test_cuda_branch_scan_sees_each_form():
    """Negative control for the scan: each spelling is found, look-alikes are not."""
    source = textwrap.dedent(
        """
        if x.is_cuda: pass
        if t.device.type == "cuda": pass
        if "cuda" != torch.device(d).type: pass
        if p.device.type in ("cuda", "xpu"): pass
        if x.dtype == torch.float16 or node.type == "linear" or device == "cpu": pass
        """
    )
    assert [line for line, _ in cuda_branches(source)] == [2, 3, 4, 5]


# ---------------------------------------------------- cited files and modules exist in the repo
# A docstring or comment that cites a file (`docs/LOG.md`, `bench/kernels.py`, `tests/...`) or a
# module (`qlora.ops.dequantize_4bit`) sends the reader there, so it must exist. Checked: paths
# whose first part is a top-level folder of this repository, and dotted `qlora.` names (a module,
# or a name a module defines). `../shared/...` (the assets beside the repository) is allowed;
# paths of other projects (`peft/utils/other.py`, the QLoRA repo's `examples/...`) are not ours.

_PATH = re.compile(r"(?<![\w./-])((?:\.\./)?[\w.*-]+(?:/[\w.*-]+)+/?)")
_DOTTED = re.compile(r"(?<![\w./-])(qlora(?:\.\w+)+)")
_FILE_SUFFIXES = {"py", "md", "json", "jsonl", "sh", "yaml", "toml", "txt", "jinja"}


def docs_and_comments(source: str):
    """(line, text) of every docstring and comment of a module's source."""
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
            continue
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            yield first.lineno, first.value.value
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string


def defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                names |= {c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def repository_folders(root: Path) -> set[str]:
    """The top-level folders of the repository itself: not hidden, not ignored by .gitignore (runs/ and
    .cache/ appear once the demo has run; an example path like runs/mine is not a citation)."""
    ignore = root / ".gitignore"
    ignored = {line.strip().strip("/") for line in ignore.read_text(encoding="utf-8").splitlines()} \
        if ignore.is_file() else set()  # fmt: skip
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in ignored}


def missing_citations(source: str, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, reference) of each cited path or qlora name in `source` that does not exist under `root`."""
    ours = repository_folders(root)
    missing = []
    for start, text in docs_and_comments(source):
        for match in _PATH.finditer(text):
            ref = match.group(1).rstrip(".")
            if ref.startswith("../shared/") or ref.split("/")[0] not in ours or "*" in ref.split("/")[0]:
                continue
            if not (list(root.glob(ref.rstrip("/"))) if "*" in ref else (root / ref).exists()):
                missing.append((start + text.count("\n", 0, match.start()), ref))
        for match in _DOTTED.finditer(text):
            parts = match.group(1).split(".")
            if parts[-1] in _FILE_SUFFIXES:  # a file name such as qlora.py (the QLoRA repo's script)
                continue
            k = next(k for k in range(len(parts), 0, -1) if k == 1 or module_path(".".join(parts[:k]), root))
            found = module_path(".".join(parts[:k]), root)
            if found is None or (k < len(parts) and parts[k] not in defined_names(found)):
                missing.append((start + text.count("\n", 0, match.start()), match.group(1)))
    return sorted(missing)


def test_cited_files_and_modules_exist():
    missing = [f"{p.relative_to(REPO)}:{line}: {ref}" for p in python_files()
               for line, ref in missing_citations(p.read_text(encoding="utf-8"))]  # fmt: skip
    assert not missing, "cited but not in the repository (fix the reference, or add the file):\n" + "\n".join(missing)


def test_citation_check_sees_a_missing_file():
    """Negative control: missing files and names are found; existing ones and others' paths are not."""
    source = textwrap.dedent(
        '''
        """See docs/LOG.md, tests/test_layering.py and tests/kernels/*.py; not docs/NO_SUCH_FILE.md.

        Beside the repo: ../shared/reference/design.md. Elsewhere: peft/utils/other.py, qlora.py.
        """
        # qlora.quant.codes.table_4bit exists, qlora.quant.no_such_name does not; nor bench/gone.py.
        '''
    )
    assert missing_citations(source) == [(2, "docs/NO_SUCH_FILE.md"), (6, "bench/gone.py"),
                                         (6, "qlora.quant.no_such_name")]  # fmt: skip
