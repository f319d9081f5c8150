"""Tests of the measurement helpers (saved activation bytes, FLOPs) on graphs with known costs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bsr_kernels.measure import MIB, count_flops, saved_activations


def test_mm_saves_both_operands():
    a = torch.randn(5, 7, requires_grad=True)
    b = torch.randn(7, 3, requires_grad=True)
    s = saved_activations(lambda: (a @ b).sum())
    assert s.bytes == (5 * 7 + 7 * 3) * 4
    assert s.num_storages == 2 and s.num_saved == 2
    assert s.output.requires_grad


def test_parameters_excluded_and_frozen_weights_save_nothing_for_them():
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    s = saved_activations(lambda: lin(x), exclude=[lin])
    assert s.bytes == 4 * 16 * 4  # the input, for the weight gradient; the weight is excluded
    lin.requires_grad_(False)
    s = saved_activations(lambda: lin(x), exclude=[lin])
    assert s.bytes == 0  # input gradient only needs the (excluded) weight


def test_buffers_of_an_excluded_module_do_not_count():
    """A module's buffers are its state, as its parameters are: a buffer that autograd keeps
    (here for the input's gradient of ``x * w``) does not count when the module is excluded."""
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randn(6))

        def forward(self, x):
            return (x * self.w).exp()           # mul keeps w; exp keeps its (3, 6) result

    m, x = Scale(), torch.randn(3, 6, requires_grad=True)
    assert saved_activations(lambda: m(x).sum(), exclude=[m]).bytes == 3 * 6 * 4
    assert saved_activations(lambda: m(x).sum()).bytes == (3 * 6 + 6) * 4


def test_views_of_one_storage_count_once():
    x = torch.randn(2, 10, 6, requires_grad=True)

    def fn():
        qkv = x * 2.0                       # saves nothing (mul by a Python scalar)
        q, k, v = qkv.unbind(-1)[:3]        # three views of one storage
        return (q * k * v).sum()

    s = saved_activations(fn)
    # q*k saves q and k (one storage, qkv), (q*k)*v saves q*k and v (v: qkv again).
    assert s.bytes == (2 * 10 * 6 + 2 * 10) * 4
    assert s.num_storages == 2 and s.num_saved == 4   # four tensors packed, two storages


def test_dead_graphs_do_not_count():
    x = torch.randn(100, requires_grad=True)

    def fn():
        _ = (x * x).sum()                   # graph dies at once
        return (x.exp()).sum()              # exp saves its result

    s = saved_activations(fn)
    assert s.bytes == 100 * 4
    assert s.mib == pytest.approx(400 / 2**20)          # a MiB is 2**20 bytes
    assert s.mib_per_image(4) == pytest.approx(100 / 2**20)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="batch_size must be > 0"):
            s.mib_per_image(bad)


def test_no_grad_saves_nothing():
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        s = saved_activations(lambda: lin(torch.randn(3, 8)), exclude=[lin])
    assert s.bytes == 0 and s.num_saved == 0


def test_count_flops_linear():
    lin = nn.Linear(32, 16, bias=False)
    x = torch.randn(4, 32, requires_grad=True)
    f = count_flops(lambda: lin(x).square().sum())
    assert f.forward == 2 * 4 * 32 * 16
    assert f.backward == 2 * f.forward       # input grad + weight grad
    assert f.total == 3 * f.forward
    assert f.forward_macs == 4 * 32 * 16
    # per op, forward and backward together: the three matmuls of a bias-free linear layer
    assert f.by_op == {"aten.mm": f.total}
    x = torch.randn(4, 32)                   # no input grad: weight grad only
    f = count_flops(lambda: lin(x).sum())
    assert f.backward == f.forward
    f = count_flops(lambda: lin(x).sum(), backward=False)
    assert f.backward == 0 and f.total == f.forward


def test_count_flops_cpu_sdpa_option():
    q = torch.randn(2, 3, 10, 8, requires_grad=True)
    k = torch.randn(2, 3, 10, 8, requires_grad=True)
    v = torch.randn(2, 3, 10, 8, requires_grad=True)

    def fn():
        return F.scaled_dot_product_attention(q, k, v).sum()

    plain = count_flops(fn)
    counted = count_flops(fn, count_cpu_sdpa=True)
    attn_fwd = 4 * 2 * 3 * 10 * 10 * 8       # QK^T and PV
    # With the option the CPU kernel counts as torch counts its CUDA SDPA kernels: forward
    # QK^T and PV, backward five matmuls (QK^T recomputed). Stock FlopCounterMode (torch 2.14)
    # has no formula for the CPU kernel; the plain count is at most the full one.
    assert counted.forward == attn_fwd
    assert counted.backward == attn_fwd * 5 // 2
    assert plain.total <= counted.total


def test_bad_arguments():
    with pytest.raises(TypeError, match="fn"):
        saved_activations(3)
    with pytest.raises(TypeError, match="exclude"):
        saved_activations(lambda: None, exclude=[3])
    with pytest.raises(TypeError, match="forward"):
        count_flops(None)
    with pytest.raises(ValueError, match="backward"):
        count_flops(lambda: torch.ones(2))


def _grad_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    model(torch.randn(2, 3, 8, 8)).square().mean().backward()
    model[0].bias.grad = None   # trained, but without a .grad yet
    return model


@pytest.mark.parametrize("raises", [False, True])
def test_profile_leaves_existing_grads_as_they_were(raises):
    from bsr_kernels import profile
    model, images = _grad_model(), torch.randn(2, 3, 8, 8)
    grads = {n: p.grad for n, p in model.named_parameters()}
    values = {n: g.clone() for n, g in grads.items() if g is not None}
    if raises:   # the step fails once a gradient was accumulated: after the last layer's weight
        model[2].weight.register_post_accumulate_grad_hook(lambda p: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            profile(model, images)
    else:
        profile(model, images)
    for n, p in model.named_parameters():
        assert p.grad is grads[n], n   # the same tensor, or still None
        if n in values:
            assert torch.equal(p.grad, values[n]), n
    assert model[0].bias.grad is None


def test_profile_leaves_buffers_and_moe_counts_as_they_were():
    """profile runs forward twice (memory, then FLOPs): a model in training mode had its
    BatchNorm running statistics updated twice (num_batches_tracked 0 -> 2), and a MoE MLP
    that tracks usage counted the batch twice and kept profile's aux_loss. All are as they were
    now, in place (a reference to the usage tensor sees the old counts), also a buffer that a
    forward rebinds."""
    import bsr_kernels
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.LazyLinear(5))
    images = torch.randn(2, 3, 8, 8) * 3 + 1
    conv(images)                                       # materialise the lazy layer, update stats
    bn = conv[1]
    before = {n: b.clone() for n, b in conv.named_buffers()}

    class Seen(nn.Module):   # a forward that rebinds its buffer rather than updating it
        def __init__(self):
            super().__init__()
            self.register_buffer("n", torch.zeros(()))

        def forward(self, x):
            self.n = self.n + x.shape[0]
            return x

    conv.append(Seen())
    before["5.n"] = torch.zeros(())
    bsr_kernels.profile(conv.train(), images)
    assert before["1.num_batches_tracked"] == 1
    for n, b in conv.named_buffers():
        assert torch.equal(b, before[n]), n
    assert bn.training

    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2,
                            num_classes=5)
    bsr_kernels.to_moe(vit, num_experts=4, top_k=2, aux_loss_weight=0.1)
    bsr_kernels.reprogram(vit)
    moes = [m for m in vit.modules() if getattr(m, "bsr_moe", False)]
    for m in moes:
        m.track_usage = True
    x = torch.randn(2, 3, 16, 16)
    vit(x).sum().backward()
    usage = [(m.usage, m.usage.clone(), m.aux_loss) for m in moes]
    assert all(u.sum() > 0 and aux is not None for _, u, aux in usage)
    bsr_kernels.profile(vit, x)
    for m, (ref, counts, aux) in zip(moes, usage):
        assert m.usage is ref and torch.equal(m.usage, counts) and m.aux_loss is aux


def test_profile_of_a_model_with_an_empty_buffer_slot():
    """BatchNorm without running statistics registers its buffers as None: profile measures
    such a model (forward 48 * 5 multiply-adds an image, backward the weight gradient only,
    as nothing before the linear layer trains) and leaves the slots empty."""
    from bsr_kernels import profile
    bn = nn.BatchNorm1d(48, affine=False, track_running_stats=False)
    model = nn.Sequential(nn.Flatten(), bn, nn.Linear(48, 5, bias=False))
    prof = profile(model, torch.randn(2, 3, 4, 4))
    assert prof.forward_gmacs_per_image == pytest.approx(48 * 5 / 1e9, rel=1e-12)
    assert prof.train_gflops_per_image == pytest.approx(2 * 2 * 48 * 5 / 1e9, rel=1e-12)
    assert bn.running_mean is None and bn.running_var is None


def test_profile_under_no_grad_measures_the_training_step():
    """Called from an eval loop (torch.no_grad()), profile measured 0 MiB, then failed with a
    message about count_flops' backward argument; under inference_mode it says why it cannot."""
    from bsr_kernels import profile
    model, images = _grad_model(), torch.randn(2, 3, 8, 8)
    want = profile(model, images)
    assert want.saved_activation_mib_per_image > 0 and want.train_gflops_per_image > 0
    with torch.no_grad():
        got = profile(model, images)
    assert dict(got) == dict(want)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside torch.inference"):
        profile(model, images)


def test_profile_of_a_model_with_two_heads_takes_the_mean_of_their_losses():
    """timm's distilled DeiT in distillation training returns (logits, dist_logits): the default
    loss used to fail on the tuple with an AttributeError; it now averages the heads' losses."""
    import bsr_kernels
    from timm.models.deit import VisionTransformerDistilled
    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=4,
                                       num_heads=2, num_classes=5)
    model.set_distilled_training(True)
    bsr_kernels.reprogram(model)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    got = bsr_kernels.profile(model, images, labels)
    want = bsr_kernels.profile(
        model, images, labels,
        loss_fn=lambda out, y: (F.cross_entropy(out[0], y) + F.cross_entropy(out[1], y)) / 2)
    assert dict(got) == dict(want)
    one_head = bsr_kernels.profile(model, images, labels,
                                   loss_fn=lambda out, y: F.cross_entropy(out[0], y))
    assert got.train_gflops_per_image > one_head.train_gflops_per_image
    assert bsr_kernels.profile(model, images).saved_activation_mib_per_image > 0


def test_profile_reports_per_image_costs_of_a_known_step():
    """Two linear layers on flattened images, whose step costs are known by hand. Forward:
    48 * 8 + 8 * 5 multiply-adds an image. Backward: both weight gradients and the second
    layer's input gradient (the images need no gradient). Autograd keeps the flattened images
    (a view of the batch), the first layer's output and the logits (the default loss squares
    them), and the second layer's weight, which is a parameter and does not count. Every
    figure is per image, whatever the batch. Labels reach the memory pass too."""
    from bsr_kernels import profile
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8, bias=False),
                          nn.Linear(8, 5, bias=False))
    macs = 48 * 8 + 8 * 5
    for b in (1, 3):
        prof = profile(model, torch.randn(b, 3, 4, 4))
        assert prof.batch_size == b and prof.tokens_per_block == []
        assert prof.forward_gmacs_per_image == pytest.approx(macs / 1e9, rel=1e-12)
        assert prof.train_gflops_per_image == pytest.approx(
            2 * (macs + macs + 8 * 5) / 1e9, rel=1e-12)
        assert prof.saved_activation_mib_per_image == pytest.approx((48 + 8 + 5) * 4 / MIB,
                                                                    rel=1e-12)
        assert len(prof) == 5 == len(list(prof))
        prof["note"] = "added"
        assert len(prof) == 6 == len(list(prof))
        # With labels, cross-entropy: it keeps the log-probabilities instead of the logits, the
        # int64 labels and one float32 total weight for the batch.
        prof = profile(model, torch.randn(b, 3, 4, 4), torch.arange(b) % 5)
        assert prof.saved_activation_mib_per_image == pytest.approx(
            ((48 + 8 + 5) * 4 + 8 + 4 / b) / MIB, rel=1e-12)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        profile(model, torch.randn(2, 3, 4, 4))


def test_profile_counts_the_cpu_attention_kernel():
    """profile counts the CPU SDPA kernel (count_cpu_sdpa), which stock FlopCounterMode
    misses: a fused-attention ViT has the forward of the same ViT with explicit attention (its
    matmuls are always counted), and a backward larger by half the attention's forward, as
    torch counts the SDPA backward (QK^T recomputed)."""
    from timm.models.vision_transformer import VisionTransformer

    from bsr_kernels import profile
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                            num_classes=5)
    x = torch.randn(2, 3, 16, 16)
    fused = profile(vit, x)
    stock = count_flops(lambda: vit(x).float().square().mean())
    for blk in vit.blocks:
        blk.attn.fused_attn = False
    explicit = profile(vit, x)
    attn = 2 * 4 * 17 * 17 * 32           # QK^T and PV forward FLOPs an image, two blocks
    assert fused.forward_gmacs_per_image == pytest.approx(explicit.forward_gmacs_per_image,
                                                          rel=1e-12)
    assert (fused.train_gflops_per_image - explicit.train_gflops_per_image) * 1e9 \
        == pytest.approx(attn / 2, rel=1e-9)
    assert stock.forward / 2 == pytest.approx(x.shape[0] * (fused.forward_gmacs_per_image * 1e9
                                                            - attn / 2), rel=1e-12)
