"""The layers of DESIGN.md import downwards only: no module imports a higher layer."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fastft"


def imported(path: Path) -> set[str]:
    """The fastft modules ``path`` imports (absolute names), at any depth of the file."""
    package = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] \
                if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n == "fastft" or n.startswith("fastft.")}


def files(*parts):
    target = PKG.joinpath(*parts)
    return sorted(target.glob("*.py")) if target.is_dir() else [target]


@pytest.mark.parametrize("path,forbidden", [
    *[(p, ("fastft.ops",)) for p in files("backends.py")],
    *[(p, ("fastft.", "fastft")) for p in files("safeio.py")],
    *[(p, ("fastft.adapters", "fastft.train", "fastft.patch")) for p in files("optim")],
    *[(p, ("fastft.adapters", "fastft.train", "fastft.profile")) for p in files("methods")],
], ids=lambda v: v.name if isinstance(v, Path) else "")
def test_no_import_of_a_higher_layer(path, forbidden):
    allowed = {"fastft.errors", "fastft.errors.FastftError", "fastft.errors.check"}
    bad = sorted(n for n in imported(path) - allowed
                 if any(n == f or n.startswith(f if f.endswith(".") else f + ".")
                        for f in forbidden))
    assert not bad, f"{path.relative_to(PKG.parent)} imports {bad}"


def test_a_checkout_does_not_hide_the_library_named_kernels():
    """Run from the repository root (``python -c``, ``python -m``), the top-level name
    ``kernels`` is the library transformers imports, not fastft's Triton folder."""
    import importlib.metadata
    import os
    import subprocess
    import sys

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("no library named kernels is installed")
    root = PKG.parent
    code = ("import kernels, fastft.kernels, transformers.modeling_utils; "
            "print(kernels.__file__); print(fastft.kernels.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    lib, ours = out.stdout.split()
    assert not Path(lib).resolve().is_relative_to(root / "kernels")
    assert Path(ours).resolve() == (root / "kernels" / "__init__.py").resolve()


def test_a_checkout_without_the_library_named_kernels_reads_as_not_installed():
    """Where no library named ``kernels`` is installed, importing that name from the root
    gives an empty module (no file, no version), as transformers' probe expects of a stray
    folder, and ``from kernels import ...`` fails with ImportError instead of reaching
    fastft's Triton kernels."""
    import subprocess
    import sys

    code = "\n".join([
        "import importlib, importlib.util",
        "assert importlib.util.find_spec('kernels') is not None",  # this folder is found
        "k = importlib.import_module('kernels')",
        "assert getattr(k, '__file__', None) is None and not hasattr(k, '__version__')",
        "assert not hasattr(k, 'KERNEL_FILES')",
        "try:",
        "    from kernels import get_kernel",
        "except ImportError:",
        "    print('ImportError')",
    ])
    # -S: no site-packages, so no installed library of that name can be found
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=PKG.parent,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ImportError"]
