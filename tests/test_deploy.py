"""Deploying a reprogrammed model: torch.export, ONNX (dynamo and TorchScript exporters) in
onnxruntime, jit.trace, and jit.script's refusal."""
from __future__ import annotations

import importlib.util
import io
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import bsr_kernels
from bsr_kernels.export import (cls_attention_decomposition, drop_tokens_aten,
                                drop_tokens_decomposition, select_aten)
from bsr_kernels.ops import reference
from bsr_kernels.ops.common import num_kept

from _same import assert_same

REPO = Path(__file__).resolve().parents[1]
HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="onnx, onnxscript or onnxruntime is not "
                                "installed (pip install -e '.[test]')")


def tiny_vit(seed=0, fuse_token=True, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=4, embed_dim=32, depth=6, num_heads=2, num_classes=5)
    args.update(kw)
    model = VisionTransformer(**args)
    bsr_kernels.reprogram(model, keep_rate=0.4, fuse_token=fuse_token)
    return model.eval()


def images(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _ort_logits(onnx_bytes_or_path, x):
    import onnxruntime as ort
    sess = ort.InferenceSession(onnx_bytes_or_path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def test_num_kept_takes_traced_sizes():
    assert num_kept(0.3, torch.tensor(10)) == 3 == num_kept(0.3, 10)


def test_num_kept_of_a_float32_keep_rate():
    """A keep_rate that went through float32 (numpy, tensor.item()) kept one token too many
    where keep_rate * M is whole: float32 0.1 of 10 kept 2, of 190 kept 20."""
    import numpy as np
    for rate, m, want in ((0.1, 10, 1), (0.3, 10, 3), (0.1, 190, 19), (0.7, 196, 138),
                          (0.5, 197, 99), (0.25, 196, 49)):
        for r in (rate, float(np.float32(rate)), torch.tensor(rate).item()):
            assert num_kept(r, m) == want, (r, m)
    assert num_kept(0.3000004, 10) == 4   # a real excess over a whole count still counts
    assert num_kept(0.5, torch.tensor(64)) == 32


@pytest.mark.parametrize("fuse", [True, False])
def test_aten_drop_is_the_reference(fuse):
    """The export form of the drop (no stable sort) follows the selection rule exactly: random
    scores, all-equal scores (ties go to the lower position) and NaN scores (ranked lowest)."""
    g = torch.Generator().manual_seed(0)
    b, h, n, d, c, p = 3, 2, 17, 4, 6, 1
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    q, k = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(2))
    q_tie = q.clone()
    q_tie[:, :, 0] = 0          # CLS query 0: uniform scores, every candidate tied
    q_nan = q.clone()
    k_nan = k.clone()
    k_nan[1, :, 5] = float("nan")    # one NaN score
    for qq, kk in ((q, k), (q_tie, k), (q_nan, k_nan)):
        for n_keep in (1, 7, 15, 16):
            want = reference.drop_tokens(x, qq, kk, 0.5, p, n_keep, fuse)
            got = drop_tokens_aten(x, qq, kk, 0.5, p, n_keep, fuse)
            assert torch.equal(got[1], want[1])
            torch.testing.assert_close(got[0], want[0], equal_nan=True, rtol=0, atol=1e-12)
    kept_tie = drop_tokens_aten(x, q_tie, k, 0.5, p, 7, fuse)[1]
    assert kept_tie.tolist() == [list(range(7))] * b


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_decompositions_give_the_ops_outputs(x_dtype):
    """What the ONNX exporter puts in place of the custom ops gives their outputs, dtypes
    included: kept as int32, a bf16 residual stream (autocast, fp32 q and k) stays bf16 with
    its fused token, and the prefix length is the one passed (3 here: CLS and two registers)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 6, generator=g).to(x_dtype)
    q, k = (torch.randn(2, 2, 12, 4, generator=g) for _ in range(2))
    ops = torch.ops.bsr_kernels
    for p in (1, 3):
        for fuse in (True, False):
            assert_same(drop_tokens_decomposition(x, q, k, 0.5, p, 4, fuse),
                        ops.drop_tokens.default(x, q, k, 0.5, p, 4, fuse, "reference"),
                        f"p={p} fuse={fuse}")
        assert_same(cls_attention_decomposition(q, k, 0.5, p),
                    ops.cls_attention.default(q, k, 0.5, p, "reference"), f"p={p}")


def test_torch_export_gives_the_eager_logits():
    model, x = tiny_vit(), images()
    with torch.no_grad():
        want = model(x)
        ep = torch.export.export(model, (x,))
        got = ep.module()(x)
    assert "bsr_kernels.drop_tokens" in str(ep.graph)    # the fast op stays in the graph
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_select_aten_ranks_nan_lowest_among_finite_scores():
    """The drop test above makes NaN scores of a whole row (a NaN key spoils the row's
    softmax), so it cannot tell NaN ranked lowest from a tie, and scores of q and k are never
    infinite. select_aten, public, takes any scores: rows that mix NaN, -inf, ties and finite
    scores select as the reference does (it ranked -inf level with NaN before)."""
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(5, 11, generator=g, dtype=torch.float64)
    nan, inf = float("nan"), float("inf")
    scores[0, [2, 5]] = nan                        # two NaN among finite scores
    scores[1, [3, 7, 9]] = 2.0                     # a tie at the top
    scores[1, [0, 4]] = nan
    scores[2, :] = nan                             # NaN but for 6 and 8: those two, then
    scores[2, [6, 8]] = 0.5                        # the lowest positions
    scores[3, [1, 4]] = -inf                       # -inf ranks above NaN (below by hand)
    scores[3, [0, 2, 10]] = nan
    scores[4, :6] = nan
    for n_keep in (1, 2, 4, 9, 10, 11):
        want = reference.select_tokens(scores, n_keep)[0]
        assert torch.equal(select_aten(scores, n_keep), want), n_keep
    # by hand: the 6 finite scores of row 3, then its -inf (1, 4) above its NaN (0, 2, 10)
    assert select_aten(scores, 9)[3].tolist() == [0, 1, 3, 4, 5, 6, 7, 8, 9]
    assert select_aten(scores, 6)[3].tolist() == [3, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("grad", [False, True])
def test_jit_trace_gives_the_eager_logits(grad):
    """Traced with or without grad mode (the lean backward's custom Function is not traced);
    the graph holds plain aten ops only, so it runs where bsr_kernels is not installed."""
    model, x = tiny_vit(fuse_token=grad), images()    # with and without the fused token
    with torch.no_grad():
        want = model(x)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, x)
    assert "bsr_kernels::" not in str(traced.inlined_graph)   # no custom op
    with torch.no_grad():
        torch.testing.assert_close(traced(x), want, rtol=1e-5, atol=1e-5)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(buf)(x), want, rtol=1e-5, atol=1e-5)


def moe_model(seed=0):
    """A reprogrammed multitask MoE model (4 experts, top-2, in blocks 1, 3, 5) whose experts
    differ, set to task 1."""
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=6, num_heads=2,
                            num_classes=5)
    bsr_kernels.to_moe(vit, num_experts=4, top_k=2, num_tasks=2)
    with torch.no_grad():
        for _, moe in bsr_kernels.moe.moe_blocks(vit):
            for p in (moe.fc1_weight, moe.fc2_weight):
                p.add_(0.2 * torch.randn_like(p))
    model = bsr_kernels.MultiTaskViT(vit, num_classes=[3, 4])
    bsr_kernels.reprogram(model, keep_rate=0.4)
    model.set_task(1)
    return model.eval()


def test_moe_model_exports_and_traces_with_data_dependent_routing():
    """A MoE model's routed experts have data-dependent sizes, which neither tracer records:
    while one records, every expert runs on every token, weighted by its gate weight. The
    exported and traced graphs route each new input anew (checked on images other than the
    example), giving the eager logits."""
    model, x, other = moe_model(), images(4), images(4, seed=7)
    with torch.no_grad():
        want = model(other)
        ep = torch.export.export(model, (x,))
        torch.testing.assert_close(ep.module()(other), want, rtol=1e-5, atol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(other), want, rtol=1e-5, atol=1e-5)
    assert "bsr_kernels::" not in str(traced.inlined_graph)


@needs_onnx
def test_moe_model_in_onnxruntime(tmp_path, monkeypatch):
    """Also export_onnx's file: written atomically (over an older one), one str is one name,
    the opset asked for."""
    import onnx

    from bsr_kernels import checkpoint
    renames = []

    def replace(src, dst):
        renames.append((os.path.basename(src), os.path.basename(dst)))
        os.replace(src, dst)
    monkeypatch.setattr(checkpoint, "_replace", replace)
    model, x, other = moe_model(seed=2), images(4), images(3, seed=7)
    with torch.no_grad():
        want = model(other)
    path = tmp_path / "moe.onnx"
    path.write_bytes(b"an older export")
    bsr_kernels.export_onnx(model, x, path, input_names="pixels", output_names="probs",
                            opset_version=18)     # torch 2.14's exporter defaults to 20
    assert renames == [(checkpoint.tmp_name(path).name, "moe.onnx")]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["moe.onnx"]
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["pixels"]
    assert [o.name for o in graph.output] == ["probs"]
    assert [(o.domain, o.version) for o in onnx.load(str(path)).opset_import
            if o.domain in ("", "ai.onnx")] == [("", 18)]
    torch.testing.assert_close(_ort_logits(str(path), other), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_a_vit_built_with_token_drop_attention_scripts_as_timms_does(qk_norm, fused):
    """TokenDropAttention as a drop-in (attn_layer=) keeps timm's Attention scriptable: its
    forward no longer goes through forward_qk's Python callable, which TorchScript cannot
    compile. Until the model is reprogrammed (then the refusal below). Either attention path
    (``fused_attn``) scripts."""
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
              qk_norm=qk_norm)
    model = VisionTransformer(attn_layer=bsr_kernels.TokenDropAttention, **kw).eval()
    timm_model = VisionTransformer(**kw).eval()
    timm_model.load_state_dict(model.state_dict())
    for b in (*model.blocks, *timm_model.blocks):
        b.attn.fused_attn = fused
    x = images()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        want = timm_model(x)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(scripted(x), want, rtol=1e-5, atol=1e-6)


def test_jit_script_is_refused_naming_the_supported_routes():
    model = tiny_vit()
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script does not support.*"
                                           r"torch\.export\.export.*dynamo=True.*jit\.trace"):
        torch.jit.script(model)


def test_fx_tracing_is_refused_naming_what_works():
    """torch.fx symbolic tracing (timm's create_feature_extractor, AttentionExtract's default
    method) failed with 'a reprogrammed (BSR) block takes no attn_mask/is_causal', which the
    user never passed (fx hands the model's default attn_mask=None in as a placeholder). It is
    refused for what it is now, and the routes it names work: forward_intermediates, and
    AttentionExtract's hooks with fused_attn=False."""
    from timm.models import create_feature_extractor
    from timm.utils import AttentionExtract
    model, x = tiny_vit(), images(2)
    for trace in (lambda: torch.fx.symbolic_trace(model), lambda: AttentionExtract(model)(x),
                  lambda: create_feature_extractor(model, return_nodes=["blocks.1"])):
        with pytest.raises(RuntimeError, match=r"torch\.fx symbolic tracing .* does not support"
                                               r".*forward_intermediates.*method='hook'"):
            trace()
    for b in model.blocks:
        b.attn.fused_attn = False
    maps = AttentionExtract(model, method="hook")(x)
    assert len(maps) == len(model.blocks) and all(m.shape[0] == 2 for m in maps.values())
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert len(inter) == len(model.blocks)


@needs_onnx
def test_onnx_dynamo_export_in_onnxruntime():
    """Plain ``torch.onnx.export(dynamo=True)``, no extra arguments: the drop op is decomposed.
    One model whose CLS query is zero in a dropping block, so its scores are all tied."""
    model, x = tiny_vit(), images(4)
    first = next(b for b in model.blocks if b.bsr_drops)
    with torch.no_grad():
        dim = model.embed_dim
        first.attn.qkv.weight[:dim] = 0
        first.attn.qkv.bias[:dim] = 0
        want = model(x)
    prog = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    got = _ort_logits(prog.model_proto.SerializeToString(), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_onnx
def test_onnx_torchscript_exporter_in_onnxruntime():
    model, x = tiny_vit(seed=3, reg_tokens=2, no_embed_class=True), images(2)
    with torch.no_grad():
        want = model(x)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False)
    torch.testing.assert_close(_ort_logits(buf.getvalue(), x), want, rtol=1e-4, atol=1e-4)


def test_export_onnx_checks_its_arguments():
    model = tiny_vit()
    with pytest.raises(ValueError, match="images"):
        bsr_kernels.export_onnx(model, torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="at least 2"):
        bsr_kernels.export_onnx(model, images(1))


@needs_onnx
def test_export_onnx_passes_its_options_to_the_exporter(monkeypatch):
    """Without dynamic_batch a batch of one exports (its size is fixed in the graph), and no
    dynamic shape is asked for; with it, the batch dimension is dynamic. The opset asked for
    is passed on."""
    got = []
    monkeypatch.setattr(torch.onnx, "export", lambda model, args, **kw: got.append(kw))
    model = tiny_vit()
    bsr_kernels.export_onnx(model, images(1), dynamic_batch=False)
    assert "dynamic_shapes" not in got[-1] and "opset_version" not in got[-1]
    bsr_kernels.export_onnx(model, images(2), opset_version=18)
    (dims,) = got[-1]["dynamic_shapes"]
    assert list(dims) == [0] and got[-1]["opset_version"] == 18


def test_export_onnx_refuses_a_folder_as_path_before_exporting(tmp_path, monkeypatch):
    def export(*args, **kwargs):
        raise AssertionError("exported before the path was checked")

    monkeypatch.setattr(torch.onnx, "export", export)
    with pytest.raises(ValueError, match=f"path {tmp_path} is a folder"):
        bsr_kernels.export_onnx(tiny_vit(), images(2), tmp_path)


def test_export_onnx_checks_the_folder_and_names_before_exporting(tmp_path, monkeypatch):
    def export(*args, **kwargs):
        raise AssertionError("exported before the arguments were checked")

    monkeypatch.setattr(torch.onnx, "export", export)
    missing = tmp_path / "missing" / "m.onnx"
    with pytest.raises(ValueError, match=f"path {missing}: its folder {missing.parent} does "
                                         "not exist"):
        bsr_kernels.export_onnx(tiny_vit(), images(2), missing)
    assert list(tmp_path.iterdir()) == []
    for bad in ("", [], ["images", 3]):
        with pytest.raises(ValueError, match="input_names must be a name or a list"):
            bsr_kernels.export_onnx(tiny_vit(), images(2), input_names=bad)


@needs_onnx
def test_export_onnx_of_a_compiled_model_exports_the_model_itself(monkeypatch):
    """torch.compile's OptimizedModule failed inside torch.export with torch's generic error;
    export_onnx exports the model it wraps, and the model DataParallel wraps. A wrapper of the
    user's own that holds the model as ``module`` (its forward may normalise the input) is
    exported whole, compiled or not."""
    got = []
    monkeypatch.setattr(torch.onnx, "export", lambda model, *a, **k: got.append(model))
    model = tiny_vit()

    class Normalized(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x * 2 - 1)

    own = Normalized(model)
    parallel = torch.nn.DataParallel(model)
    for given in (torch.compile(model), parallel, torch.compile(parallel), own,
                  torch.compile(own)):
        bsr_kernels.export_onnx(given, images(2))
    assert got == [model] * 3 + [own] * 2


@needs_onnx
def test_export_onnx_example_runs(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",   # this checkout's bsr_kernels, installed or not
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "python/export_onnx.py", "--out",
                        str(tmp_path / "m.onnx")], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.onnx").stat().st_size > 100_000
    m = re.search(r"on 7 images: max \|logit diff\| (\S+), same predictions: (\w+)", r.stdout)
    assert m, r.stdout
    assert float(m.group(1).rstrip(",")) < 1e-4 and m.group(2) == "True"
