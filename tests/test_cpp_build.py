"""The C++ extension bsr_kernels.ops._C: it is built, loads, registers its ops, and the cpp backend
reports clearly what it cannot run. Numerical agreement of every backend with the reference is
tested in test_ops.py (BSR_BACKEND=cpp); here only a few build-level checks touch numbers."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bsr_kernels
from bsr_kernels.ops import cpp as cpp_mod
from bsr_kernels.ops import reference
from bsr_kernels.ops.cpp import BUILD_COMMAND, CppBackend

REPO = Path(__file__).resolve().parents[1]
OPS = ("cpp_cls_scores", "cpp_cls_scores_backward", "cpp_drop_forward", "cpp_drop_backward",
       "cpp_gather_backward")


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("BSR_BACKEND", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _qkvx(b=3, h=2, n=13, d=8, c=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d, generator=g, dtype=dtype)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # timm's strided views
    return torch.randn(b, n, c, generator=g, dtype=dtype), q, k


def test_extension_loads():
    from bsr_kernels.ops import _C  # noqa: F401

    assert cpp_mod.extension_error() is None, cpp_mod.extension_error()
    assert Path(_C.__file__).name.startswith("_C")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_is_available_on_cpu(dtype):
    assert "cpp" in bsr_kernels.available_backends("cpu", dtype)
    assert CppBackend().not_supported_reasons(torch.device("cpu"), dtype) == []


def test_ops_are_registered_with_schemas():
    for name in OPS:
        op = getattr(torch.ops.bsr_kernels, name)
        schema = op.default._schema
        assert schema.name == f"bsr_kernels::{name}"
    args = [a.name for a in torch.ops.bsr_kernels.cpp_drop_forward.default._schema.arguments]
    assert args == ["x", "q", "k", "scale", "num_prefix_tokens", "n_keep", "fuse_token"]


@pytest.mark.parametrize("device,dtype,needle", [
    ("cuda", torch.float32, "CPU"),
    ("cpu", torch.bfloat16, "float32 and float64"),
    ("cpu", torch.float16, "float32 and float64"),
    ("cuda", torch.bfloat16, "CPU"),
])
def test_clear_reasons_for_unsupported(device, dtype, needle):
    reasons = CppBackend().not_supported_reasons(torch.device(device), dtype)
    assert reasons and any(needle in r for r in reasons), reasons
    if dtype != torch.float32:
        assert any(str(dtype) in r for r in reasons), reasons


def test_forced_cpp_runs_bfloat16_in_float32_and_refuses_other_devices(monkeypatch):
    """Forced C++ on bf16 tensors runs the float32 kernels on cast copies (the compute dtype of
    the definition), as the default dispatch does; on a device it cannot run it raises with
    every backend's reasons."""
    monkeypatch.setenv("BSR_BACKEND", "cpp")
    x, q, k = (t.to(torch.bfloat16) for t in _qkvx())
    out, kept = bsr_kernels.drop_tokens(x, q, k, 0.5)
    want, want_kept = bsr_kernels.drop_tokens(x.float(), q.float(), k.float(), 0.5)
    assert out.dtype == torch.bfloat16 and torch.equal(kept, want_kept)
    assert torch.equal(out, want.to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="cpp: runs on CPU tensors only, got device meta"):
        bsr_kernels.drop_tokens(*(t.to("meta") for t in (x, q, k)), 0.5)


def test_default_cpu_backend_is_cpp():
    from bsr_kernels.ops.dispatch import select_backend

    if os.environ.get("BSR_BACKEND"):
        pytest.skip("BSR_BACKEND forces a backend in this run")
    assert select_backend(torch.device("cpu"), torch.float32).name == "cpp"


@pytest.mark.parametrize("first", ["extension", "package"])
def test_loads_with_python_ops_in_either_order(first):
    """TORCH_LIBRARY(bsr_kernels) in C++ and the torch.library.custom_op fragments of the same
    namespace in bsr_kernels.ops coexist whichever is registered first."""
    load_ext_first = """
        import glob, importlib.util, os, torch
        pkg = os.path.join(importlib.util.find_spec("bsr_kernels").submodule_search_locations[0],
                           "ops")  # find_spec("bsr_kernels.ops") would import the package first
        (so,) = glob.glob(os.path.join(pkg, "_C*.so")) + glob.glob(os.path.join(pkg, "_C*.pyd"))
        torch.ops.load_library(so)
        import bsr_kernels
    """
    load_pkg_first = """
        import torch, bsr_kernels
        from bsr_kernels.ops import _C
    """
    code = (load_ext_first if first == "extension" else load_pkg_first) + """
        torch.manual_seed(0)
        x = torch.randn(2, 9, 4); q = torch.randn(2, 3, 9, 8); k = torch.randn(2, 3, 9, 8)
        out, kept = bsr_kernels.drop_tokens(x, q, k, 0.5)
        o2 = torch.ops.bsr_kernels.cpp_drop_forward(x, q, k, 8 ** -0.5, 1, 4, True)
        assert torch.equal(out, o2[0]) and torch.equal(kept, o2[1].long())
        assert "cpp" in bsr_kernels.available_backends("cpu")
        print("OK")
    """
    res = _run_python(code)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_missing_extension_warns_once_and_reports_build_command():
    """Without the built extension nothing raises on import; one warning and the reason both give
    the build command."""
    res = _run_python("""
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "bsr_kernels.ops._C":
                    raise ImportError("simulated: no bsr_kernels.ops._C")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, bsr_kernels
            from bsr_kernels.ops.dispatch import all_backends
            backends = all_backends()
            import bsr_kernels.ops.cpp  # a second import must not warn again
        mine = [w for w in caught if "bsr_kernels.ops._C" in str(w.message)]
        assert len(mine) == 1, [str(w.message) for w in caught]
        print("WARNING:", mine[0].message)
        reasons = backends["cpp"].not_supported_reasons(torch.device("cpu"), torch.float32)
        print("REASON:", reasons)
        assert "cpp" not in bsr_kernels.available_backends("cpu")
        import os
        os.environ["BSR_BACKEND"] = "cpp"
        try:
            bsr_kernels.cls_attention(torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2))
        except RuntimeError as e:
            print("ERROR:", repr(str(e)))
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = {ln.split(":", 1)[0]: ln for ln in res.stdout.splitlines() if ":" in ln}
    for key in ("WARNING", "REASON", "ERROR"):
        assert BUILD_COMMAND in lines[key], res.stdout


def test_unbuilt_extension_is_called_not_built(tmp_path):
    """A checkout with no compiled ``_C`` (run from PYTHONPATH, as on a GPU machine) is told the
    extension is not built, not Python's "partially initialized module ... (most likely due to a
    circular import)"."""
    import shutil

    shutil.copytree(REPO / "bsr_kernels", tmp_path / "bsr_kernels",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", "import bsr_kernels.ops.cpp as c; "
                          "print('ERROR:', c.extension_error())"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ERROR: ImportError: not built:" in res.stdout, res.stdout
    assert "circular" not in res.stdout + res.stderr and BUILD_COMMAND in res.stderr
    # an extension built for another Python is named as such
    (tmp_path / "bsr_kernels" / "ops" / "_C.cpython-39-x86_64-linux-gnu.so").write_bytes(b"")
    res = subprocess.run([sys.executable, "-c", "import bsr_kernels.ops.cpp as c; "
                          "print('ERROR:', c.extension_error())"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert "holds _C.cpython-39-x86_64-linux-gnu.so, built for another Python" in res.stdout, \
        res.stdout + res.stderr[-2000:]


def test_bad_inputs_raise_naming_the_argument():
    ops = torch.ops.bsr_kernels
    x, q, k = _qkvx()
    with pytest.raises(ValueError, match="n_keep"):
        ops.cpp_drop_forward(x, q, k, 0.3, 1, 13, True)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        ops.cpp_drop_forward(x, q, k, 0.3, 13, 1, True)
    with pytest.raises(TypeError, match="q must be float32 or float64"):
        ops.cpp_cls_scores(q.half(), k.half(), 0.3, 1)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        ops.cpp_cls_scores(q, k.double(), 0.3, 1)
    with pytest.raises(ValueError, match="x has 12 tokens"):
        ops.cpp_drop_forward(x[:, :12], q, k, 0.3, 1, 4, True)
    out, kept, scores, lse = ops.cpp_drop_forward(x, q, k, 0.3, 1, 4, True)
    bad = kept.clone()
    bad[1, 2] = 12  # M = 12 candidates: 12 is out of range
    with pytest.raises(ValueError, match="kept indices"):
        ops.cpp_drop_backward(torch.ones_like(out), x, q, k, bad, scores, lse, 0.3, 1)
    with pytest.raises(ValueError, match="kept indices"):
        ops.cpp_gather_backward(out[:, :5], -bad.abs() - 1, 13, 1)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        ops.cpp_drop_backward(out[:, :-1], x, q, k, kept, scores, lse, 0.3, 1)


def test_direct_calls_check_what_the_python_layer_would():
    """The cpp_* ops are public (torch.ops.bsr_kernels) and a direct call skips bsr_kernels'
    Python checks, so each op checks its own inputs: no prefix token, a k of another shape
    than q, an x of another dtype than q, a full selection given to the fused drop's backward,
    and a grad_out with fewer rows than P + n_keep are refused, naming what is wrong. Without
    its check each but the x dtype ran and returned numbers (reading past the rows of a short
    k or grad_out); the x dtype failed inside, in a RuntimeError that names neither x nor q."""
    ops = torch.ops.bsr_kernels
    x, q, k = _qkvx()                                  # B=3, H=2, N=13, d=8, C=5
    with pytest.raises(ValueError, match="num_prefix_tokens must be in"):
        ops.cpp_cls_scores(q, k, 0.3, 0)
    with pytest.raises(ValueError, match="num_prefix_tokens must be in"):
        ops.cpp_drop_forward(x, q, k, 0.3, 0, 4, True)
    for bad_k in (k[..., :7], k[:, :1], k[:, :, :12]):
        with pytest.raises(ValueError, match="k must have the shape of q"):
            ops.cpp_cls_scores(q, bad_k, 0.3, 1)
    with pytest.raises(TypeError, match="x must have the dtype of q"):
        ops.cpp_drop_forward(x.double(), q, k, 0.3, 1, 4, True)
    out, kept, scores, lse = ops.cpp_drop_forward(x, q, k, 0.3, 1, 4, True)
    every = torch.arange(12, dtype=torch.int32).expand(3, 12)
    with pytest.raises(ValueError, match="needs n_keep < N - P = 12, got n_keep=12"):
        ops.cpp_drop_backward(torch.ones(3, 14, 5), x, q, k, every, scores, lse, 0.3, 1)
    with pytest.raises(ValueError, match="grad_out must have at least P \\+ n_keep = 5"):
        ops.cpp_gather_backward(out[:, :4], kept, 13, 1)


def test_direct_calls_take_the_other_dtypes_their_checks_allow():
    """cpp_cls_scores_backward takes a grad_scores of any floating dtype and computes in q's
    (a float64 one beside float32 q and k gives the result of its float32 copy), and
    cpp_gather_backward (a scatter: no arithmetic) runs bfloat16 and float16 grad_out as they
    are, equal to the reference."""
    ops = torch.ops.bsr_kernels
    x, q, k = _qkvx(seed=4)
    scores, lse = ops.cpp_cls_scores(q, k, 0.3, 1)
    gs = torch.randn(scores.shape, generator=torch.Generator().manual_seed(5),
                     dtype=torch.float64)
    got = ops.cpp_cls_scores_backward(gs, q, k, lse, 0.3, 1)
    want = ops.cpp_cls_scores_backward(gs.float(), q, k, lse, 0.3, 1)
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(got, want))
    kept = ops.cpp_drop_forward(x, q, k, 0.3, 1, 4, False)[1]
    for dtype in (torch.bfloat16, torch.float16):
        g = torch.randn(3, 5, 5, generator=torch.Generator().manual_seed(6)).to(dtype)
        gx = ops.cpp_gather_backward(g, kept, 13, 1)
        assert gx.dtype == dtype
        assert torch.equal(gx, reference.gather_backward(g, kept, 13, 1))


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    """Schema, fake (Meta) kernels and dispatch of each cpp op."""
    ops = torch.ops.bsr_kernels
    x, q, k = _qkvx(n=11, c=6)
    out, kept, scores, lse = ops.cpp_drop_forward(x, q, k, 0.5, 2, 4, True)
    g = torch.Generator().manual_seed(1)

    def rnd(like):
        return torch.randn(like.shape, generator=g, dtype=like.dtype)
    args = {
        "cpp_cls_scores": (q, k, 0.5, 2),
        "cpp_cls_scores_backward": (rnd(scores), q, k, lse, 0.5, 2),
        "cpp_drop_forward": (x, q, k, 0.5, 2, 4, True),
        "cpp_drop_backward": (rnd(out), x, q, k, kept, scores, lse, 0.5, 2),
        "cpp_gather_backward": (rnd(out[:, :6]), kept, 11, 2),
    }[op]
    torch.library.opcheck(getattr(ops, op).default, args)


def test_parallel_matches_serial_and_reference():
    """Batch elements are independent: 1 and 2 threads give bitwise equal results, which agree
    with the reference (a smoke check; test_ops.py holds the full comparison)."""
    x, q, k = _qkvx(b=6, h=6, n=197, d=64, c=48, seed=3)  # big enough to run in parallel
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.bsr_kernels.cpp_drop_forward(x, q, k, 0.125, 1, 98, True)
        torch.set_num_threads(2)
        two = torch.ops.bsr_kernels.cpp_drop_forward(x, q, k, 0.125, 1, 98, True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    ref = reference.drop_tokens(x, q, k, 0.125, 1, 98, True)
    assert torch.equal(one[1].long(), ref[1])
    torch.testing.assert_close(one[0], ref[0])
