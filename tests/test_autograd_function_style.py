"""No custom autograd.Function returns the result of an in-place op from forward or backward, nor ends its
forward in a dtype cast that may change nothing.

On torch 2.11 + CUDA, a compiled block whose autograd.Function forward ended in
``return x.new_zeros(n, d).index_copy_(0, idx, x)`` lost that Function's backward: the input gradient came
back as zeros (the FP8 experts' 4% loss gap of 2026-11-26). torch 2.13 on the CPU, which CI runs, computes it
correctly, so a numerical test here cannot catch a relapse; this scan of the source can. Write the op out of
place (``index_copy``, ``scatter``, ...) instead.

The same torch gives a compiled Function all-zero input gradients when its forward ends in a ``.to(dtype)`` that
is a no-op (fp32 -> fp32; found 2026-12-07: ``_CombineCopies`` in compiled fp32 blocks, so every routed expert,
router and MoE input got no gradient). Return ``dsv3.kernels.casting.cast_result(t, dtype)`` instead.
"""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dsv3"


def _is_function_subclass(node: ast.ClassDef) -> bool:
    return any(ast.unparse(b).endswith("autograd.Function") for b in node.bases)


def _returned_method_calls(fn: ast.FunctionDef, is_bad) -> list[str]:
    """Return statements whose value (or a tuple element of it) is a call of a method whose name ``is_bad``."""
    bad = []
    for node in ast.walk(fn):
        if not isinstance(node, ast.Return) or node.value is None:
            continue
        values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
        for v in values:
            if isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute) and is_bad(v.func.attr):
                bad.append(f"line {node.lineno}: {ast.unparse(v)[:80]}")
    return bad


def _is_in_place(method: str) -> bool:
    return method.endswith("_") and not method.startswith("__")


# casts that return their input unchanged when the dtype already matches
_MAYBE_NOOP_CASTS = {"to", "float", "half", "bfloat16", "double", "type_as", "type"}


def scan(root: Path) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and _is_function_subclass(n)):
            for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in ("forward", "backward")):
                found = _returned_method_calls(fn, _is_in_place)
                if fn.name == "forward":
                    found += _returned_method_calls(fn, _MAYBE_NOOP_CASTS.__contains__)
                problems += [f"{path.relative_to(root.parent)} {cls.name}.{fn.name} {p}" for p in found]
    return problems


def test_no_autograd_function_returns_an_in_place_result():
    assert scan(SRC) == []


def _scan_function(tmp_path, forward_return: str, backward_return: str) -> list[str]:
    """scan() of a package holding one autograd.Function with these return expressions."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "import torch\n"
        "class F(torch.autograd.Function):\n"
        "    @staticmethod\n"
        "    def forward(ctx, x, idx, rows):\n"
        f"        return {forward_return}\n"
        "    @staticmethod\n"
        "    def backward(ctx, g):\n"
        f"        return {backward_return}\n")
    return scan(pkg)


def test_the_scan_finds_the_pattern(tmp_path):
    found = _scan_function(tmp_path, "x.new_zeros(rows, x.shape[1]).index_copy_(0, idx, x)", "g.clone(), None, None")
    assert len(found) == 1 and "F.forward" in found[0] and "index_copy_" in found[0], found


def test_the_scan_finds_a_cast_ending_a_forward(tmp_path):
    # a cast ending the backward is fine (only forwards lost their gradients)
    found = _scan_function(tmp_path, "(x.float() * idx).sum(dim=1).to(x.dtype)", "g.to(torch.float32), None, None")
    assert len(found) == 1 and "F.forward" in found[0] and ".to(x.dtype)" in found[0], found
