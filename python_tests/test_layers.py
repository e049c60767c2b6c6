"""The layering of docs/ARCHITECTURE.md, checked: the library imports none of the applications, and the
spec and kernel layers import neither torch.nn modules nor transformers."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "transpeft_kernels"
APPLICATIONS = ("workflow", "bench", "perf", "commands", "cli")
LOWER = {  # layer -> the package's own layers it may import
    "reference": {"reference", "specs"},
    "kernels": {"kernels", "specs", "reference"},
    "ops": {"ops", "kernels", "specs", "reference"},
    "integration": {"integration", "ops", "kernels", "specs", "reference"},
}


def test_the_library_imports_no_application():
    code = ("import sys, transpeft_kernels, transpeft_kernels.ops, transpeft_kernels.reference; "
            "print(sorted(m for m in sys.modules if m.startswith('transpeft_kernels.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=PACKAGE.parent, check=True).stdout
    loaded = [m.split(".")[1] for m in eval(out)]
    assert not set(loaded) & set(APPLICATIONS), loaded


def _imports(path: Path) -> list[str]:
    """Absolute names of the modules a file imports (relative imports resolved within the package)."""
    tree = ast.parse(path.read_text())
    here = path.relative_to(PACKAGE.parent).with_suffix("").parts
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - node.level])
                mod = ".".join(base + ([node.module] if node.module else []))
                out += [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                out.append(node.module or "")
    return out


def test_imports_go_one_way():
    bad = []
    for layer, allowed in LOWER.items():
        for f in (PACKAGE / layer).rglob("*.py"):
            for name in _imports(f):
                parts = name.split(".")
                model_code = parts[0] == "transformers" or name in ("torch.nn", "torch.nn.modules") \
                    or name.startswith("torch.nn.modules.")
                if model_code and layer in ("reference", "kernels"):
                    bad.append((str(f.relative_to(PACKAGE)), name))
                if parts[0] == "transpeft_kernels" and len(parts) > 1:
                    target = parts[1]
                    if target not in allowed and target not in ("env", "errors", "atomic_io"):
                        bad.append((str(f.relative_to(PACKAGE)), name))
    assert not bad, bad
