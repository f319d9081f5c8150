"""The benchmark suite runs end to end on tiny models and writes every section.

``python -m benchmarks.run --tiny --quick --no-compile`` runs all five sections on a tiny 12-block
ViT (one torch thread) in a subprocess; the test checks the files it writes, that the figures are
consistent with each other (not their speed: timings never go into assertions), and that the
README section prints from them. Also unit tests of the suite's small helpers.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
SECTIONS = ("drop_tokens", "attention", "train_step", "memory", "moe")
VARIANTS = ("full", "linear_probe", "eager_bsr", "peer_bsr", "bsr_autograd", "bsr_lean", "bsr_fast",
            "bsr_lean_bf16")


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--tiny", "--quick", "--no-compile",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json") as f:
        results = json.load(f)
    return out, results, proc.stdout


def test_results_json_has_every_section(suite_run):
    out, results, _ = suite_run
    for name in SECTIONS:
        assert name in results, name
        assert "error" not in results[name], results[name].get("traceback")
    meta = results["meta"]
    assert meta["config"]["tiny"] and meta["config"]["device"] == "cpu"
    assert meta["command"].startswith("python -m benchmarks.run")
    assert meta["machine"]["cpu_count"] >= 1 and meta["date"]
    assert set(meta["section_seconds"]) == set(SECTIONS)


def test_markdown_names_where_appended_sections_were_measured(suite_run, tmp_path):
    """results.md's header names one machine (the newest run's); when ``--append`` joined
    sections measured on other machines or commits, it lists each section's origin."""
    run = _import_bench("run")
    out, results, _ = suite_run
    assert "measured apart" not in run.write_markdown(results, str(tmp_path / "one.md"))
    mixed = json.loads(json.dumps(results))
    mixed["meta"]["section_origins"] = {"drop_tokens": dict(date="2026-11-26",
                                                            machine="AMD EPYC", commit="b627eea")}
    md = run.write_markdown(mixed, str(tmp_path / "mixed.md"))
    own = run._origin(results["meta"])
    assert "drop_tokens: AMD EPYC, commit b627eea, 2026-11-26" in md
    assert f"train_step: {own['machine']}, commit {own['commit'] or '?'}, {own['date']}" in md


def test_drop_section_rows(suite_run):
    _, results, _ = suite_run
    sec = results["drop_tokens"]
    rows = sec["rows"]
    op_candidates = {r["candidate"] for r in rows if r["scope"] == "op"}
    assert "eager composite" in op_candidates
    assert {"bsr reference", "bsr cpp"} <= op_candidates
    assert "torch.compile(reference)" not in op_candidates  # --no-compile
    # the no-compute floor runs in the backward passes only
    assert {r["pass_"] for r in rows if r["candidate"] == "no-compute floor"} == {
        "fwd+bwd", "fwd+bwd leaves"}
    block = {r["candidate"] for r in rows if r["scope"] == "attention+drop"}
    assert block == {"eager attention + composite", "SDPA + CLS-row softmax", "SDPA + bsr drop"}
    assert {r["pass_"] for r in rows if r["scope"] == "op"} == {"forward", "fwd+bwd",
                                                                 "fwd+bwd leaves"}
    assert {r["pass_"] for r in rows if r["scope"] == "attention+drop"} == {"forward", "fwd+bwd"}
    # host time at a tiny shape: the registered op (the baseline), the public function and the
    # backend kernel alone, in both passes
    host = {(r["pass_"], r["candidate"]) for r in rows if r["scope"] == "host"}
    assert host == {(p, c) for p in ("forward, inputs need grad", "fwd+bwd")
                    for c in ("registered op", "bsr_kernels.drop_tokens", "backend kernel")}
    assert {r["scope"] for r in rows} == {"op", "attention+drop", "host"}
    for r in rows:
        assert r["median_ms"] > 0 and r["paired_speedup_vs_eager"] > 0
        # per-round samples, paired across the candidates of one timing (the CPU target's ratio)
        assert len(r["samples_ms"]) == r["reps"]
        assert statistics.median(r["samples_ms"]) == pytest.approx(r["median_ms"])
        if r["candidate"] in ("eager composite", "eager attention + composite",
                              "registered op"):
            assert r["paired_speedup_vs_eager"] == 1.0
    fwd = [r for r in rows if r["scope"] == "op" and r["pass_"] == "forward"]
    assert all(r["min_bytes"] > 0 and r["gbps"] > 0 for r in fwd)
    bw = sec["bandwidth"]  # a copy measured in this run is the bound, on CPU too
    assert bw["bound_source"] == "measured copy" and bw["bound_gbps"] == bw["copy_gbps"] > 0
    for r in fwd:
        assert r["bound_fraction"] == pytest.approx(r["gbps"] / bw["copy_gbps"])
    # every backend kept the same tokens as the reference on the random inputs, every shape
    assert sec["agreement"], "no kept-set agreement was measured"
    for a in sec["agreement"]:
        measured = {k: v for k, v in a.items() if k.startswith("bsr ")}
        assert {"bsr reference", "bsr cpp"} <= set(measured), a
        assert all(v == 1.0 for v in measured.values()), a


def test_attention_section_rows(suite_run):
    _, results, _ = suite_run
    rows = results["attention"]["rows"]
    names = {r["candidate"] for r in rows}
    assert names == {"timm Attention (fused)", "timm Attention (eager)", "TokenDropAttention",
                     "eager attention + composite drop", "TokenDropAttention + bsr drop"}
    assert all(r["median_ms"] > 0 for r in rows)


def test_train_step_section_consistency(suite_run):
    _, results, _ = suite_run
    sec = results["train_step"]
    by = {r["variant"]: r for r in sec["rows"]}
    assert tuple(by) == VARIANTS
    for r in by.values():
        assert r["step_s"] > 0 and len(r["step_samples_s"]) == sec["config"]["reps"]
        assert r["train_gflops_per_image"] > 0
    # the measured costs order as the method says they must, whatever the speed
    assert by["bsr_lean"]["saved_mib_per_image"] < by["eager_bsr"]["saved_mib_per_image"] \
        < by["full"]["saved_mib_per_image"]
    assert by["bsr_lean_bf16"]["saved_mib_per_image"] < by["bsr_lean"]["saved_mib_per_image"]
    assert by["bsr_lean"]["saved_mib_per_image"] <= by["bsr_fast"]["saved_mib_per_image"] \
        <= by["bsr_autograd"]["saved_mib_per_image"] < by["full"]["saved_mib_per_image"]
    # the plain-PyTorch peer trains what BSR trains and computes what autograd mode computes
    assert by["peer_bsr"]["trained_params"] == by["bsr_autograd"]["trained_params"] \
        == by["bsr_lean"]["trained_params"]
    assert by["peer_bsr"]["train_gflops_per_image"] == pytest.approx(
        by["bsr_autograd"]["train_gflops_per_image"], rel=0.05)
    assert by["bsr_fast"]["train_gflops_per_image"] < by["full"]["train_gflops_per_image"]
    assert by["linear_probe"]["trained_params"] < by["bsr_lean"]["trained_params"] \
        < by["full"]["trained_params"]
    assert by["bsr_lean"]["trained_params"] == by["eager_bsr"]["trained_params"]
    # tokens entering each block: drops in blocks 3, 6, 9 keep ceil(M / 2) of the M candidates
    # plus the fused token: 17 -> 1 + 8 + 1 = 10 -> 1 + 5 + 1 = 7 -> 1 + 3 + 1 = 5
    expected = [17] * 4 + [10] * 3 + [7] * 3 + [5] * 2
    assert by["bsr_lean"]["tokens_per_block"] == expected
    assert by["eager_bsr"]["tokens_per_block"] == expected
    # bf16 saved activations: approximate gradients, close to the exact ones but not equal
    comp = sec["compressed_gradient_error"]
    assert 0 < comp["global_rel_err"] <= comp["max_param_rel_err"] < 0.05
    assert any("gradient relative error" in n for n in sec["notes"])
    assert by["full"]["tokens_per_block"] == [17] * 12
    # every target has a verdict; the GPU ones are not measured on CPU
    verdicts = {t["name"]: t["verdict"] for t in results["targets"]}
    assert any(n.startswith("saved activations, lean") for n in verdicts)
    assert all(v == "NOT MEASURED" for n, v in verdicts.items() if n.startswith("GPU")
               or n.startswith("fused drop"))
    assert all(v in ("PASS", "FAIL") for n, v in verdicts.items() if n.startswith("CPU"))


def test_memory_section(suite_run):
    _, results, _ = suite_run
    sec = results["memory"]
    sizes = {r["img_size"] for r in sec["saved"]}
    assert sizes == {32, 48}
    for r in sec["saved"]:
        assert r["saved_mib_per_image"] > 0 and r["fixed_mib"] > 0
        est = {int(b): v for b, v in r["estimate_mib"].items()}
        assert sorted(est) == [1, 2, 4, 8, 16, 32, 64, 128]
        assert est[128] > est[1]
        assert r["max_batch_estimate"] > 0
    fits = {(r["img_size"], r["variant"]): r["max_batch_estimate"] for r in sec["max_batch"]}
    for s in sizes:  # BSR fits more images than full fine-tuning, and fewer at the larger size
        assert fits[(s, "bsr_lean")] > fits[(s, "full")]
    assert fits[(48, "full")] < fits[(32, "full")]
    assert {r["batch"] for r in sec["time"]} == {1, 2}


def test_markdown_plots_and_readme(suite_run):
    out, results, stdout = suite_run
    md = (out / "results.md").read_text()
    for name in SECTIONS:
        assert f"## {name}" in md
    assert md.count("PASS: ") + md.count("FAIL: ") + md.count("NOT MEASURED: ") \
        == len(results["targets"])
    for png in ("drop_tokens.png", "train_step.png", "memory.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        assert png in md
    # run.py prints one verdict line per target
    assert sum(line.split(":")[0] in ("PASS", "FAIL", "NOT MEASURED")
               for line in stdout.splitlines()) == len(results["targets"])
    proc = subprocess.run([sys.executable, "-m", "benchmarks.readme_section",
                           str(out / "results.md"), "--link", "benchmarks/results/x.md"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("## Performance")
    assert results["meta"]["command"] in text and results["meta"]["date"] in text
    assert "--tiny" in text and "Training step" in text and "Largest training batch" in text


def _import_bench(name):
    import importlib
    return importlib.import_module(f"benchmarks.{name}")


#: The figures of a ``step_rows`` row besides its time (None where not measured).
_STEP_FIGURES = ("images_per_s", "speedup_vs_full", "speedup_vs_eager",
                 "speedup_vs_full_compiled", "speedup_vs_peer_compiled")


def _step_row(variant, s, **figures):
    """A ``step_rows`` row of ``variant``: ``s`` seconds a step, three rounds of ``s`` (none
    when it was not timed), then ``figures`` (which may override any key)."""
    return {"variant": variant, "label": variant, "step_s": s,
            "step_samples_s": [s] * 3 if s else [], **figures}


def test_benchmarks_is_a_package_without_path_hacks():
    """``benchmarks`` imports as a package; no module in it edits ``sys.path``, and the suite
    has one timer module, one input builder and one anchors table."""
    import glob
    files = sorted(glob.glob(os.path.join(BENCH, "*.py")))
    assert os.path.join(BENCH, "__init__.py") in files
    texts = {os.path.basename(f): open(f).read() for f in files}
    for name, text in texts.items():
        assert "sys.path" not in text, name
        assert "def make_inputs" not in text or name == "_suite.py", name
        assert "def qkv_inputs" not in text, name
        assert "ANCHORS = " not in text or name == "bench_train_step.py", name
        for one in ("def interleaved", "def paired_ratio", "class Rotating", "def rotation_"):
            assert one not in text or name == "_timing.py", (one, name)
    suite = _import_bench("_suite")
    x, q, k, v, qkv = suite.make_inputs(2, 5, 2, 8, requires_grad=True)
    assert x.shape == (2, 5, 8) and q.shape == k.shape == v.shape == (2, 2, 5, 4)
    assert q._base is qkv and x.requires_grad and qkv.requires_grad
    # read x (2*5*8), q_cls (2*2*4), K (2*2*5*4); write CLS + ceil(4/2) kept + fused rows
    assert suite.min_bytes(2, 2, 5, 8, 0.5, 1, torch.float32) == 4 * (80 + 16 + 80 + 2 * 4 * 8)
    assert suite.min_bytes(2, 2, 2, 8, 0.5, 1, torch.float32) == 4 * (32 + 16 + 32 + 2 * 2 * 8)


def test_every_benchmark_command_help_describes_it_in_whole_sentences():
    """``--help`` of every benchmark command starts with its module docstring's first paragraph,
    whole: the docstrings' first lines alone stop mid-sentence."""
    import contextlib
    import io
    import pkgutil
    suite = _import_bench("_suite")
    names = [m.name for m in pkgutil.iter_modules([BENCH])
             if m.name.startswith(("bench_", "probe_")) or m.name in ("run", "readme_section")]
    assert {"bench_gpu", "bench_train_step", "probe_sac", "run"} <= set(names), names
    for name in names:
        module = _import_bench(name)
        if not hasattr(module, "main"):
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            module.main(["--help"])
        text = " ".join(out.getvalue().split())
        if name != "run":   # run.py's description is its own line
            summary = suite.doc_summary(module.__doc__)
            assert summary.endswith((".", ")")) and summary in text, (name, summary)


def test_variants_are_the_methods_registry():
    """The suite's variants are methods of ``bsr_kernels.methods`` with the same trained
    parameters as the methods themselves."""
    import timm
    from bsr_kernels import methods
    suite = _import_bench("_suite")

    def fresh():
        torch.manual_seed(0)
        return suite.create_vit("tiny")

    def names(model, params):
        ids = {id(p) for p in params}
        return {n for n, p in model.named_parameters() if id(p) in ids}

    head = {"head.weight", "head.bias"}
    for variant, method, options in [
            ("full", "full", {}), ("linear_probe", "linear", {}), ("eager_bsr", "eager_bsr", {}),
            ("bsr_lean", "bsr", {}), ("bsr_fast", "bsr", dict(memory_mode="fast")),
            ("bsr_autograd", "bsr", dict(memory_mode="autograd")),
            ("bsr_lean_bf16", "bsr", dict(activation_dtype=torch.bfloat16))]:
        a, b = fresh(), fresh()
        _, params = suite.build_variant(variant, a)
        m = methods.setup(b, method, **options)
        assert names(a, params) == names(b, m.params) == set(methods.trainable_parameters(b))
        if variant == "linear_probe":
            assert names(a, params) == head
        if variant == "full":
            assert len(params) == len(list(a.parameters()))
    peer = fresh()
    assert names(peer, suite.build_variant("peer_bsr", peer)[1]) == set(
        methods.trainable_parameters(methods.setup(fresh(), "bsr").model))
    bsr = set(methods.trainable_parameters(methods.setup(fresh(), "bsr").model))
    eager = set(methods.trainable_parameters(methods.setup(fresh(), "eager_bsr").model))
    assert bsr == eager and head < bsr
    assert {n.split(".")[1] for n in bsr if n.startswith("blocks.")} == {"3", "7", "11"}
    assert isinstance(methods.setup(fresh(), "full").module, timm.models.VisionTransformer)


def test_scaling_helpers():
    sc = _import_bench("bench_scaling")
    slope, dev = sc.fit_slope([1, 2, 4], [3.0, 6.0, 12.0])
    assert slope == pytest.approx(3.0) and dev == pytest.approx(0.0)
    slope, dev = sc.fit_slope([1, 2], [2.0, 6.0])  # 2, 3 per image: fitted 2.8
    assert slope == pytest.approx(14 / 5) and dev == pytest.approx((2.8 - 2.0) / 2.8)
    assert sc.max_batch(100.0, 40.0, 7.0) == 8
    assert sc.max_batch(100.0, 120.0, 7.0) == 0
    with pytest.raises(ValueError, match="per_image_bytes"):
        sc.max_batch(100.0, 10.0, 0.0)


def test_target_verdicts_and_config_errors():
    suite = _import_bench("_suite")
    assert suite.Target("a", 3.0, "<=", 3.0).verdict == "PASS"
    assert suite.Target("a", 3.1, "<=", 3.0).verdict == "FAIL"
    assert suite.Target("a", 3.3, ">=", 3.3).verdict == "PASS"
    assert suite.Target("a", None, ">=", 3.3).verdict == "NOT MEASURED"
    timing = _import_bench("_timing")
    assert timing.copy_gbps("cpu", 1 << 20) > 0
    with pytest.raises(ValueError, match="device"):
        timing.copy_gbps("tpu")
    with pytest.raises(ValueError, match="nbytes"):
        timing.copy_gbps("cpu", 0)
    assert "FAIL: a: 2" in suite.Target("a", 2.0, ">=", 3.3, "x").line()
    # a value just off its bound keeps the digits that show which side it is on (the H100's
    # 0.4999 of the copy bandwidth read "FAIL: ... 0.5 (target >= 0.5)")
    assert "FAIL: a: 0.4999 " in suite.Target("a", 0.49990, ">=", 0.5).line()
    assert "PASS: a: 0.501 " in suite.Target("a", 0.50104, ">=", 0.5).line()
    assert "FAIL: a: 1.0001 x" in suite.Target("a", 1.00012, "<=", 1.0, "x").line()
    assert "PASS: a: 0.5 " in suite.Target("a", 0.49996, "<=", 0.5).line()
    with pytest.raises(ValueError, match="device"):
        suite.SuiteConfig(device="tpu")
    with pytest.raises(ValueError, match="budget_gib"):
        suite.SuiteConfig(budget_gib=0)
    with pytest.raises(ValueError, match="variant"):
        suite.build_variant("lora", None)
    for bad in ("bsr_lean+jit", "lora+compile", "+compile"):
        with pytest.raises(ValueError, match="variant"):
            suite.split_variant(bad)
    assert suite.split_variant("bsr_lean+cudagraphs") == ("bsr_lean", "cudagraphs")
    assert suite.split_variant("full") == ("full", None)
    assert suite.variant_label("full+compile") == "timm full fine-tuning, torch.compile"
    assert suite.split_variant("bsr_lean+graph") == ("bsr_lean", "graph")
    assert suite.variant_label("bsr_lean+graph").endswith(", whole step in one CUDA graph")
    ts = _import_bench("bench_train_step")
    assert ts.step_variants(suite.SuiteConfig(device="cpu", compile=False)) == suite.VARIANTS
    if torch.cuda.is_available():
        assert ts.step_variants(suite.SuiteConfig(device="cuda", compile=False)) \
            == suite.VARIANTS + suite.GRAPHED_VARIANTS


def test_graphed_step_refuses_cpu():
    """``+graph`` (a whole step captured in one CUDA graph) is CUDA only: on CPU the variant is
    built as its eager base, and making its step says why it cannot run."""
    suite = _import_bench("_suite")
    cfg = suite.SuiteConfig(device="cpu", tiny=True)
    model = suite.create_vit("tiny")
    module, params = suite.build_variant("bsr_lean+graph", model)
    assert module is model  # not compiled: the step is what gets captured
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="variant: \\+graph needs CUDA"):
        suite.make_step(module, params, images, torch.tensor([0, 1]), cfg, graph=True)


def test_readme_section_rejects_bad_path(tmp_path):
    rs = _import_bench("readme_section")
    with pytest.raises(ValueError, match="path"):
        rs.load_results(str(tmp_path / "missing.json"))
    bad = tmp_path / "r.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="path"):
        rs.load_results(str(bad))


def test_run_rejects_unknown_section(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--out",
                           str(tmp_path), "--sections", "drop_tokens,speed"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--sections" in proc.stderr


def test_train_step_reports_a_failing_variant(monkeypatch):
    """A variant that raises is reported (error, no figures, its targets NOT MEASURED) and the
    other variants are still measured and compared. Eager variants only: with empty compile
    caches (a fresh CI machine) the compiled ones took this test from 7 s to 248 s, and
    test_compiled_step_variant_matches_eager covers them."""
    import torch
    ts = _import_bench("bench_train_step")
    suite = _import_bench("_suite")
    real = ts.build_variant

    def build(variant, model):
        module, params = real(variant, model)
        if variant != "bsr_fast":
            return module, params

        class Broken(torch.nn.Module):
            def forward(self, images):
                raise TypeError("x must have the dtype of q")
        return Broken(), params

    monkeypatch.setattr(ts, "build_variant", build)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sec = ts.run(suite.SuiteConfig(tiny=True, quick=True, compile=False), log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    by = {r["variant"]: r for r in sec["rows"]}
    assert "x must have the dtype of q" in by["bsr_fast"]["error"]
    assert by["bsr_fast"]["step_s"] is None and by["bsr_fast"]["saved_mib_per_image"] is None
    for v in ("full", "eager_bsr", "bsr_lean"):
        assert "error" not in by[v] and by[v]["step_s"] > 0 and by[v]["speedup_vs_full"] > 0
    verdicts = {t["name"]: t for t in sec["targets"]}
    fast = verdicts["saved activations, fast"]
    assert fast["verdict"] == "NOT MEASURED" and "bsr_fast failed" in fast["where"]
    assert verdicts["saved activations, lean"]["verdict"] in ("PASS", "FAIL")
    assert "(FAILED)" in ts.table(sec)


def test_merge_results_keeps_other_sections_and_refuses_mixing():
    run = _import_bench("run")

    def res(device, quick, sections, cmd, cpu="AMD EPYC", commit="c1"):
        meta = dict(config=dict(device=device, quick=quick, tiny=True), command=cmd,
                    section_seconds={s: 1.0 for s in sections}, date="d",
                    machine=dict(cpu=cpu, git_commit=commit))
        out = {"meta": meta}
        for s in sections:
            out[s] = {"rows": [s], "targets": [dict(name=s)]}
        return out

    prev = res("cpu", True, ["drop_tokens", "attention"], "a")
    new = res("cpu", True, ["attention", "memory"], "b")
    new["attention"]["rows"] = ["new"]
    merged = run.merge_results(prev, new, ["attention", "memory"])
    assert merged["drop_tokens"] == prev["drop_tokens"]
    assert merged["attention"]["rows"] == ["new"] and "memory" in merged
    assert [t["name"] for t in merged["targets"]] == ["drop_tokens", "attention", "memory"]
    assert merged["meta"]["command"] == "a && b"
    # each section keeps where it was measured, through a second append too
    a, b = (dict(date="d", machine="AMD EPYC", commit="c1", command=c) for c in "ab")
    assert run.section_origins(merged) == {"drop_tokens": a, "attention": b, "memory": b}
    later = run.merge_results(merged, res("cpu", True, ["memory"], "c", "Intel Xeon", "c2"),
                              ["memory"])
    origins = run.section_origins(later)
    assert origins["memory"] == dict(date="d", machine="Intel Xeon", commit="c2", command="c")
    assert (origins["drop_tokens"], origins["attention"]) == (a, b)
    assert later["meta"]["machine"]["cpu"] == "Intel Xeon"   # the header's: the newest run
    with pytest.raises(ValueError, match="append"):
        run.merge_results(prev, res("cpu", False, ["memory"], "c"), ["memory"])


def test_step_timing_starts_a_compiled_build_when_its_expected_time_fits(monkeypatch):
    """With a deadline, a compiled build starts only when the slowest compiled build so far (a
    prior of 75 s before any, or what an earlier part measured: ``build_s``) fits before it,
    1.3 times (bench_train_step.compiled_build_room_s, the one place of that rule); eager
    builds need no room. A fake clock stands in for the compilations (80 s, then 30 s); the
    rows so far are reported after each build and after the timing (what a stop keeps), with
    each build's seconds; graph breaks are counted after the timing, only for those built."""
    from types import SimpleNamespace
    ts = _import_bench("bench_train_step")
    suite = _import_bench("_suite")
    cfg = suite.SuiteConfig(tiny=True, quick=True)
    assert ts.compiled_build_room_s() == pytest.approx(1.3 * 75)
    assert ts.compiled_build_room_s(10.0) == pytest.approx(13.0)
    clock = [1000.0]
    monkeypatch.setattr(ts, "time", SimpleNamespace(time=lambda: clock[0],
                                                    perf_counter=lambda: clock[0]))
    explained = []
    monkeypatch.setattr(ts, "graph_breaks", lambda cfg, v, build: explained.append(v) or {})
    real = ts._default_build(cfg)
    costs = {"peer_bsr+compile": 80.0, "bsr_autograd+compile": 30.0, "full+compile": 1.0}

    def build(variant, batch):  # eager modules: only the clock says they compiled
        clock[0] += costs.get(variant, 0.0)
        return real(variant.partition("+")[0], batch)

    variants = ["full", "peer_bsr+compile", "bsr_autograd+compile", "full+compile"]
    reports = []

    def report(rows):
        reports.append([(r["variant"], r["step_s"] is not None, r.get("error")) for r in rows])

    monkeypatch.setattr(ts, "_default_build", lambda cfg: build)
    rows = ts.step_rows(cfg, variants, log=lambda *a: None, deadline=1200.0, report=report)
    # peer: 200 s left >= 97.5 (the prior); autograd: 120 s left >= 104 (1.3 x 80 measured);
    # full+compile: 90 s left < 104
    skipped = "step: skipped: out of time (90 s left; a compiled build needs 104 s)"
    assert reports == [[("full", False, None)],
                       [("full", False, None), ("peer_bsr+compile", False, None)],
                       [("full", False, None), ("peer_bsr+compile", False, None),
                        ("bsr_autograd+compile", False, None)],
                       [("full", False, None), ("peer_bsr+compile", False, None),
                        ("bsr_autograd+compile", False, None), ("full+compile", False, skipped)],
                       [("full", True, None), ("peer_bsr+compile", True, None),
                        ("bsr_autograd+compile", True, None), ("full+compile", False, skipped)]]
    assert [r["build_s"] for r in rows] == [0.0, 80.0, 30.0, None]
    assert explained == ["peer_bsr+compile", "bsr_autograd+compile"]
    # an earlier part's slowest build (100 s) sets the first expectation: 130 s > 100 s left
    clock[0] = 1000.0
    res = ts.time_steps(cfg, variants[:2], log=lambda *a: None, deadline=1100.0, build=build,
                        build_s=100.0)
    assert set(res["timings"]) == {"full"}
    assert res["errors"] == {"peer_bsr+compile": "skipped: out of time (100 s left; a "
                                                 "compiled build needs 130 s)"}


def test_step_timing_stops_a_build_still_running_at_the_deadline(monkeypatch):
    """A build still running at the deadline (here: waiting for an answer that never comes, as
    on a hung compile worker pool) is stopped there: its error says so, the guard around it
    cleans up, inductor's compile workers are shut down before the timing (a stand-in: what
    they compile for the stopped build must not run beside it), nothing is built after it and
    the variants built before it are timed (a stop of the whole process would have lost their
    timing). The signal handler is restored."""
    import contextlib
    import signal
    import threading
    import torch._inductor.async_compile as async_compile
    ts = _import_bench("bench_train_step")
    events = []
    monkeypatch.setattr(async_compile, "shutdown_compile_workers",
                        lambda: events.append("shutdown"), raising=False)
    monkeypatch.setattr(async_compile, "_pool_set", {"a pool"}, raising=False)
    suite = _import_bench("_suite")
    cfg = suite.SuiteConfig(tiny=True, quick=True)
    real = ts._default_build(cfg)
    never = threading.Event()
    guarded = []

    def build(variant, batch):
        if variant == "bsr_autograd+compile":
            never.wait()
        return real(variant.partition("+")[0], batch)

    @contextlib.contextmanager
    def guard(variant):  # bench_gpu's watchdog: its cleanup must run
        guarded.append(("enter", variant))
        try:
            yield
        finally:
            guarded.append(("exit", variant))

    previous = signal.getsignal(ts.STOP_SIGNAL)
    t0 = time.time()
    res = ts.time_steps(cfg, ["full", "bsr_autograd+compile", "peer_bsr"],
                        log=lambda *a: events.append(a[0].split(" ")[3]), guard=guard,
                        deadline=t0 + 10, build=build, build_s=0.01)
    assert 9 < time.time() - t0 < 60
    assert set(res["timings"]) == {"full"} and res["timings"]["full"].median > 0
    assert res["errors"]["bsr_autograd+compile"].startswith(
        "out of time: stopped at the deadline after ")
    assert res["errors"]["bsr_autograd+compile"].endswith("; compile workers shut down in 0 s")
    assert events.index("shutdown") < events.index("timing")
    assert res["errors"]["peer_bsr"] == "skipped: out of time"
    assert guarded == [("enter", "full"), ("exit", "full"), ("enter", "bsr_autograd+compile"),
                       ("exit", "bsr_autograd+compile")]
    assert set(res["build_s"]) == {"full"} and res["graph_breaks"] == {}
    assert signal.getsignal(ts.STOP_SIGNAL) is previous
    with ts.stopped_at(time.time() + 60):  # a block that ends in time is not interrupted
        pass
    time.sleep(0.1)
    assert signal.getsignal(ts.STOP_SIGNAL) is previous


def test_compile_workers_shutdown_is_waited_for_a_bounded_time(monkeypatch):
    """shut_compile_workers: inductor's shutdown waits until the workers have finished what they
    were given (torch 2.11), so it is waited for at most the limit, and then said to be still
    running; a failure is named; no shutdown function, or no pool started: nothing to say."""
    import threading
    import torch._inductor.async_compile as async_compile
    ts = _import_bench("bench_train_step")
    monkeypatch.setattr(async_compile, "_pool_set", {"a pool"}, raising=False)
    release = threading.Event()
    monkeypatch.setattr(async_compile, "shutdown_compile_workers", lambda: release.wait(30),
                        raising=False)
    t0 = time.perf_counter()
    assert ts.shut_compile_workers(0.2) == ("compile workers still busy after 0.2 s: timings "
                                            "may be skewed")
    assert time.perf_counter() - t0 < 5
    release.set()
    monkeypatch.setattr(async_compile, "shutdown_compile_workers", lambda: 1 / 0)
    assert ts.shut_compile_workers(5) == ("compile workers shutdown failed: ZeroDivisionError: "
                                          "division by zero")
    monkeypatch.setattr(async_compile, "_pool_set", set())
    assert ts.shut_compile_workers(5) == ""
    monkeypatch.delattr(async_compile, "shutdown_compile_workers")
    monkeypatch.setattr(async_compile, "_pool_set", {"a pool"})
    assert ts.shut_compile_workers(5) == ""


def test_step_peak_memory_covers_the_recording_of_cuda_graphs(monkeypatch):
    """On CUDA a step's peak memory is taken over its second and third steps: a variant under
    CUDA graphs (cudagraph trees: warm-up, then recording) records in one of them, and a replay
    allocates nothing, so a peak taken around the third step alone misses the graph's
    activations. torch.cuda's memory counters replaced by a CPU stand-in."""
    import contextlib
    from types import SimpleNamespace
    ts = _import_bench("bench_train_step")
    mib = 1 << 20
    mem = dict(now=0, peak=0)
    stand_ins = dict(synchronize=lambda: None, empty_cache=lambda: None,
                     memory_allocated=lambda: mem["now"], max_memory_allocated=lambda: mem["peak"],
                     reset_peak_memory_stats=lambda: mem.update(peak=mem["now"]))
    for name, value in stand_ins.items():
        monkeypatch.setattr(torch.cuda, name, value)

    def make_step(module, params, images, labels, cfg, digest=False, graph=False):
        calls = []

        def step():  # warm-up 3 MiB, recording 5 MiB above the resident model, replays none
            calls.append(1)
            transient = {1: 3 * mib, 2: 5 * mib}.get(len(calls), 0)
            mem["peak"] = max(mem["peak"], mem["now"] + transient)
        step.first = {"logits": [0.0], "grad_proj": [0.0]}
        return step

    def build(variant, batch):
        mem["now"] += mib  # the resident model
        return None, None, [], None, None

    monkeypatch.setattr(ts, "make_step", make_step)
    cfg = SimpleNamespace(cuda=True, device="cuda", time_batch=2, time_model="tiny", reps=2,
                          autocast=contextlib.nullcontext)
    res = ts.time_steps(cfg, ["bsr_autograd+cudagraphs"], log=lambda *a: None, build=build)
    peak = res["peaks"]["bsr_autograd+cudagraphs"]
    assert peak["peak_mib"] == pytest.approx(6.0)
    assert peak["peak_gib_above_model"] * 1024 == pytest.approx(5.0)


def test_compiled_step_variant_matches_eager(monkeypatch):
    """A compiled variant of the train_step section is timed beside its eager form and checked
    against it: the same first-step logits and gradients (``vs_eager``), ratios to the others.
    What is tested is the section's handling of a compiled variant, so it compiles with the
    aot_eager backend (inductor took 56 s of a cold cache here; inductor's code for a
    reprogrammed model is checked in test_modes.py)."""
    ts = _import_bench("bench_train_step")
    suite = _import_bench("_suite")
    monkeypatch.setitem(suite.COMPILE_MODES, "compile", dict(backend="aot_eager"))
    cfg = suite.SuiteConfig(tiny=True, quick=True)
    assert ts.step_variants(cfg) == suite.VARIANTS + tuple(
        v for v in suite.COMPILED_VARIANTS if "cudagraphs" not in v)
    assert ts.step_variants(suite.SuiteConfig(tiny=True, compile=False)) == suite.VARIANTS
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = ts.step_rows(cfg, ["full", "bsr_autograd", "bsr_autograd+compile"],
                            log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    by = {r["variant"]: r for r in rows}
    assert not any("error" in r for r in rows), rows
    comp = by["bsr_autograd+compile"]
    assert comp["vs_eager"]["logits_rel"] < 1e-4 and comp["vs_eager"]["grad_proj_rel"] < 1e-4
    assert "vs_eager" not in by["bsr_autograd"] and "graph_breaks" not in by["bsr_autograd"]
    assert comp["graph_breaks"] == {"count": 0, "reasons": []}  # torch._dynamo.explain
    assert comp["speedup_vs_full"] > 0 and comp["speedup_vs_peer_compiled"] is None
    assert len(comp["step_samples_s"]) == cfg.reps
    assert "autograd, torch.compile" in ts.step_table(rows)
    # a digest tells different gradients apart (the check above can fail)
    d = suite.digest_diff({"logits": [1.0, 2.0], "grad_proj": [1.0]},
                          {"logits": [1.0, 2.5], "grad_proj": [3.0]})
    assert d["logits_rel"] > 0.1 and d["grad_proj_rel"] > 0.5


def test_digest_diff_is_relative_to_the_reference_per_part():
    """``digest_diff(a, b)``: per part (logits, gradient projections, each on its own) the
    Euclidean norm of ``a - b`` over the norm of ``b``, the eager reference; equal digests
    differ by 0."""
    suite = _import_bench("_suite")
    a = {"logits": [1.0, 2.0], "grad_proj": [1.0, -1.0]}
    b = {"logits": [4.0, 6.0], "grad_proj": [2.0, -1.0]}
    d = suite.digest_diff(a, b)
    assert d["logits_rel"] == pytest.approx((3 ** 2 + 4 ** 2) ** 0.5 / (4 ** 2 + 6 ** 2) ** 0.5)
    assert d["grad_proj_rel"] == pytest.approx(1.0 / (2 ** 2 + 1 ** 2) ** 0.5)
    assert suite.digest_diff(b, b) == {"logits_rel": 0.0, "grad_proj_rel": 0.0}


def test_graph_breaking_compiled_variants_are_timed_after_the_others(monkeypatch):
    """``step_rows`` times the compiled variants that break their graphs (compressed lean) in a
    phase of their own, built after the first phase is timed (a graph-breaking model's cache
    entry would make one-graph models compiled before it run frame by frame), beside full
    fine-tuning and the eager formulation timed again; their ratios come from that phase, the
    other rows from the first, and their ``vs_eager`` compares with the eager mode's digest of
    the first phase. Reports keep the first phase's rows while the second runs."""
    ts = _import_bench("bench_train_step")
    suite = _import_bench("_suite")
    from benchmarks._timing import Timing
    lean = "bsr_lean_bf16+compile"   # compressed storage keeps the custom backward
    variants = ["full", "eager_bsr", "bsr_lean_bf16", "bsr_autograd+compile", lean]
    assert ts.timing_phases(variants) == [
        ("full", "eager_bsr", "bsr_lean_bf16", "bsr_autograd+compile"),
        ("full", "eager_bsr", lean)]
    assert ts.timing_phases(["full", "bsr_autograd+compile", "bsr_lean+compile"]) == [
        ("full", "bsr_autograd+compile", "bsr_lean+compile")]   # one graph since SAC
    assert ts.timing_phases([lean]) == [(lean,)]
    # per phase: step seconds of each variant, and its first step's digest
    phase_s = [{"full": 4.0, "eager_bsr": 2.0, "bsr_lean_bf16": 1.0,
                "bsr_autograd+compile": 0.5},
               {"full": 6.0, "eager_bsr": 3.0, lean: 1.5}]
    digest = {"full": [1.0], "eager_bsr": [2.0], "bsr_lean_bf16": [3.0],
              "bsr_autograd+compile": [4.0], lean: [3.3]}
    calls, reports = [], []

    def fake_time_steps(cfg, phase, log, guard, deadline, build_s=None, report=None):
        seconds = phase_s[len(calls)]
        calls.append(tuple(phase))
        res = dict(timings={}, peaks={}, errors={}, build_s={}, graph_breaks={},
                   digests={v: {"logits": digest[v], "grad_proj": [1.0]} for v in phase})
        report(res)   # built, not timed yet
        res["timings"] = {v: Timing(v, [seconds[v]] * 3, 1) for v in phase}
        return res
    monkeypatch.setattr(ts, "time_steps", fake_time_steps)
    rows = ts.step_rows(suite.SuiteConfig(tiny=True, quick=True), variants,
                        report=lambda rows: reports.append(
                            [(r["variant"], r["step_s"]) for r in rows]))
    assert calls == ts.timing_phases(variants)
    by = {r["variant"]: r for r in rows}
    assert [r["variant"] for r in rows] == variants
    assert by["full"]["step_s"] == 4.0 and by["eager_bsr"]["step_s"] == 2.0  # first phase
    row = by[lean]
    assert row["step_s"] == 1.5 and row["speedup_vs_full"] == 4.0    # 6.0 / 1.5, paired
    assert row["speedup_vs_eager"] == 2.0 and row["speedup_vs_full_compiled"] is None
    assert row["vs_eager"]["logits_rel"] == pytest.approx(0.1)          # 3.3 against 3.0
    assert by["bsr_autograd+compile"]["speedup_vs_full"] == 8.0
    # while the second phase runs, reports hold the first phase's timed rows
    assert len(reports) == 2 and reports[1] == [
        ("full", 4.0), ("eager_bsr", 2.0), ("bsr_lean_bf16", 1.0), ("bsr_autograd+compile", 0.5),
        (lean, None)]


def test_compile_order_probe_sees_one_graph_after_a_compiled_lean_model(monkeypatch):
    """benchmarks/probe_compile_order.py, and the library property it shows: compiled autograd
    mode runs two compiled functions a step (forward and backward graphs) before and after a
    lean model is compiled in the same process (lean compiles as selective checkpointing: one
    graph, no entry that would match other ViTs; until f881834 it broke its graph, and the
    autograd model ran frame by frame from then on); the probe refuses an eager variant.
    Graphs and cache entries are dynamo's and AOTAutograd's, so the variants compile with the
    aot_eager backend here (inductor took 41 s of a cold cache for the two models)."""
    probe = _import_bench("probe_compile_order")
    suite = _import_bench("_suite")
    monkeypatch.setitem(suite.COMPILE_MODES, "compile", dict(backend="aot_eager"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    try:
        res = probe.run(suite.SuiteConfig(tiny=True), "bsr_autograd+compile",
                        ["bsr_lean+compile"], reps=3, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    assert [r["after"] for r in res["rounds"]] == [None, "bsr_lean+compile"]
    assert [r["first_compiled_functions"] for r in res["rounds"]] == [2, 2]
    assert all(r["first_ms"] > 0 for r in res["rounds"]) and res["then_ms"]["bsr_lean+compile"] > 0
    with pytest.raises(ValueError, match="must be compiled"):
        probe.run(suite.SuiteConfig(tiny=True), "bsr_autograd", [])


def test_step_profile_on_cpu_and_kernel_summary():
    """``step_profile`` (the ``profile`` part of bench_gpu): wall and host time of a step and its
    aten ops; on CPU no kernel figures. ``kernel_summary`` (the CUDA side) aggregates kernels by
    name, per step, and tells copies and casts apart."""
    from types import SimpleNamespace
    ts = _import_bench("bench_train_step")
    suite = _import_bench("_suite")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = ts.step_profile(suite.SuiteConfig(tiny=True), "bsr_lean")
    finally:
        torch.set_num_threads(threads)
    assert "error" not in r, r
    assert r["wall_ms"] >= r["host_ms"] > 0 and r["ops_per_step"] > 100
    assert "kernels_per_step" not in r
    host = r["top_host"]
    assert 0 < len(host) <= 8 and all(h["ms_per_step"] > 0 and h["calls_per_step"] > 0
                                      for h in host)
    assert [h["ms_per_step"] for h in host] == sorted((h["ms_per_step"] for h in host),
                                                      reverse=True)
    events = [SimpleNamespace(name="aten::mm", self_cpu_time_total=300.0),
              SimpleNamespace(name="guard", self_cpu_time_total=500.0),
              SimpleNamespace(name="aten::mm", self_cpu_time_total=400.0),
              SimpleNamespace(name="aten::add", self_cpu_time_total=100.0)]
    assert ts.host_summary(events, steps=2, top=2) == [
        dict(name="aten::mm", ms_per_step=0.35, calls_per_step=1.0),
        dict(name="guard", ms_per_step=0.25, calls_per_step=0.5)]
    assert "error" in ts.step_profile(suite.SuiteConfig(tiny=True), "no_such_variant")

    assert ts._on_device(SimpleNamespace(device_type="DeviceType.CUDA"))
    assert not ts._on_device(SimpleNamespace(device_type="DeviceType.CUDA",
                                             is_user_annotation=True))  # record_function range
    assert not ts._on_device(SimpleNamespace(device_type="DeviceType.CPU"))

    def k(name, us):
        return SimpleNamespace(name=name, self_device_time_total=us)
    kernels = [k("gemm_a", 300.0), k("copy_kernel_bf16", 100.0), k("gemm_a", 300.0),
               k("elementwise_gelu", 50.0), k("Memcpy DtoD", 50.0), k("gemm_b", 200.0)]
    s = ts.kernel_summary(kernels, steps=2, wall_ms=1.0, top=2)
    assert s["kernels_per_step"] == 3 and s["kernel_ms_per_step"] == pytest.approx(0.5)
    assert s["device_busy"] == pytest.approx(0.5)
    assert s["copy_share"] == pytest.approx(150 / 1000)
    assert [t["name"] for t in s["top"]] == ["gemm_a", "gemm_b"]
    assert s["top"][0]["ms_per_step"] == pytest.approx(0.3) and s["top"][0]["share"] == 0.6
    # a CUDA step with no kernel recorded: the profiler could not see them (CUPTI), not 0 % busy
    none = ts.kernel_summary([], steps=2, wall_ms=1.0)
    assert set(none) == {"error"} and "no device kernels" in none["error"]


def test_bench_gpu_survives_a_hung_compile(tmp_path):
    """``bench_gpu`` (the GPU run, here its ``--smoke`` CPU form): a compilation that overruns
    ``--compile-timeout-s`` leaves its thread stacks behind. The first, the compile pool probe
    (its limit is the compile timeout when that is shorter), has the part retried compiling
    in-process (TORCHINDUCTOR_COMPILE_THREADS=1, no second probe); then the candidate that
    hangs there too is left out, and the other candidates are still measured; results.json
    and results.md are written, with the probe's outcome."""
    if _triton_interpreter_problem():
        pytest.skip(_triton_interpreter_problem())
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_gpu", "--smoke", "--out", str(tmp_path),
         "--parts", "check,step,profile,op-compiled", "--compile-timeout-s", "0.2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_COMPILE_THREADS"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    parts = results["parts"]
    assert results["env"]["compile_threads"] == "1"
    seconds = results["env"]["part_seconds"]
    assert list(seconds) == ["check", "step", "profile", "op-compiled"], seconds
    assert all(0 < s < 300 for s in seconds.values()), seconds
    check = parts["check"]
    # 3 smoke shapes x fused or not, then x the selection's 2 other digit widths
    assert check["failures"] == 0 and len(check["cases"]) == 6 + 6, check
    assert sum("select_radix_bits" in c for c in check["cases"]) == 6, check
    op = parts["op-compiled"]
    assert [h["while"] for h in op["hangs"]] == ["compile pool probe",
                                                 "compile(CLS-row composite)"]
    assert op["hangs"][0]["then"] == "retried with TORCHINDUCTOR_COMPILE_THREADS=1"
    assert op["hangs"][1]["then"] == "retried without 'compile(CLS-row composite)'"
    stacks = (tmp_path / op["hangs"][0]["stacks"]).read_text()
    assert "Timeout (0.2 s) while running 'compile pool probe'" in stacks
    assert "in probe_compile_pool" in stacks
    stacks = (tmp_path / op["hangs"][1]["stacks"]).read_text()
    assert "Timeout" in stacks and "torch/_dynamo" in stacks  # where the compile was
    probe = results["env"]["compile_pool_probe"]
    assert probe["hung"] and probe["part"] == "op-compiled" and probe["limit_s"] == 0.2
    tiny = op["tiny"]
    assert "ms" in tiny["forward"]["bsr cpp"] and "ms" in tiny["forward"]["CLS-row composite"]
    assert "hung in an earlier attempt" in tiny["errors"]["compile(CLS-row composite)"]
    assert tiny["forward speedup vs CLS-row composite"] > 0
    step = {r["variant"]: r for r in parts["step"]["rows"]}  # the train_step section's rows
    assert tuple(step) == ("full", "eager_bsr", "peer_bsr", "bsr_autograd", "bsr_fast",
                           "bsr_lean")
    assert all(r["step_s"] > 0 and r["speedup_vs_full"] > 0 for r in step.values()), step
    prof = parts["profile"]["rows"]
    assert [r["variant"] for r in prof] == ["full", "peer_bsr", "bsr_autograd", "bsr_fast",
                                            "bsr_lean"]
    assert all(r["wall_ms"] >= r["host_ms"] > 0 for r in prof), prof
    md = (tmp_path / "results.md").read_text()
    assert "| tiny |" in md and "while running 'compile(CLS-row composite)'" in md
    assert "compile pool probe (part op-compiled): did not finish in 0 s" in md
    assert "| BSR in plain PyTorch (peer_bsr)" in md
    assert "## where a step's time goes" in md and "| bsr_lean | " in md
    top_host = prof[-1]["top_host"][0]   # the lean row's costliest host event, in its cell
    assert f"{top_host['name'][:40]} {top_host['ms_per_step']:.1f}" in md


def test_graphed_step_restores_the_start_and_keeps_its_inputs_alive(monkeypatch):
    """``+graph`` without a GPU: torch.cuda's capture API replaced by CPU stand-ins (the capture
    runs the step eagerly once). At capture the trained parameters are back at their start and
    AdamW's state is zero (the first replay is the eager first step); the step keeps the module
    and the batch alive (a CUDA graph holds no reference to its inputs); the peak is taken from
    the capture."""
    import contextlib
    import gc
    import weakref
    from types import SimpleNamespace
    suite = _import_bench("_suite")
    seen = {}

    class FakeGraph:
        def replay(self):
            seen["replays"] = seen.get("replays", 0) + 1

    @contextlib.contextmanager
    def fake_capture(graph):
        params = opt_box[0].param_groups[0]["params"]
        seen["params_at_capture"] = [p.detach().clone() for p in params]
        seen["state_at_capture"] = [v.clone() for st in opt_box[0].state.values()
                                    for v in st.values() if torch.is_tensor(v)]
        seen["grads_at_capture"] = [p.grad for p in params]
        yield

    opt_box, real_adamw = [], torch.optim.AdamW

    def adamw(ps, lr, fused, capturable):
        assert fused and capturable
        opt_box.append(real_adamw(ps, lr=1e-2))  # large: the warm-up steps move the weights
        return opt_box[0]

    a_stream = SimpleNamespace(wait_stream=lambda s: None)
    stand_ins = dict(Stream=lambda: a_stream, stream=lambda s: contextlib.nullcontext(),
                     current_stream=lambda: a_stream,
                     synchronize=lambda: None, reset_peak_memory_stats=lambda: None,
                     max_memory_allocated=lambda: 1234, CUDAGraph=FakeGraph, graph=fake_capture)
    for name, value in stand_ins.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    model = suite.create_vit("tiny")
    module, params = suite.build_variant("bsr_lean+graph", model)
    start = [p.detach().clone() for p in params]
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    cfg = SimpleNamespace(cuda=True, autocast=lambda cache=True: contextlib.nullcontext())
    step = suite._graphed_step(module, params, images, labels, cfg, digest=True)
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(seen["params_at_capture"], start))
    assert seen["state_at_capture"] and all(not v.any() for v in seen["state_at_capture"])
    assert all(g is None for g in seen["grads_at_capture"])  # the graph allocates them
    assert step.peak_bytes == 1234
    refs = [weakref.ref(t) for t in (module, images, model.patch_embed.proj.weight)]
    del module, images, labels, model, params
    gc.collect()
    assert all(r() is not None for r in refs)  # kept by the step
    step()
    assert seen["replays"] == 1 and set(step.first) == {"logits", "grad_proj"}
    del step
    gc.collect()
    assert all(r() is None for r in refs)


def test_best_bsr_mode_is_run_as_its_peers_are():
    """The GPU step targets compare the best BSR mode with the compiled peer and full fine-tuning
    (eager or compiled, no CUDA graphs): a row under CUDA graphs (``+cudagraphs``, ``+graph``)
    is not a candidate, however fast, nor is compressed lean; the targets name the mode that
    was best, and the graphed rows keep their own rows."""
    ts = _import_bench("bench_train_step")
    rows = [dict(variant="bsr_lean+graph", step_s=0.5), dict(variant="bsr_lean_bf16", step_s=0.6),
            dict(variant="bsr_autograd+cudagraphs", step_s=0.45, speedup_vs_peer_compiled=2.0),
            dict(variant="bsr_fast+compile", step_s=0.9, speedup_vs_peer_compiled=1.1),
            dict(variant="bsr_lean", step_s=1.0), dict(variant="peer_bsr+graph", step_s=0.4)]
    assert ts.best_bsr(rows)["variant"] == "bsr_fast+compile"
    assert ts.best_bsr(rows, "bsr_lean")["variant"] == "bsr_lean"
    assert ts.best_bsr(rows, "bsr_autograd") is None
    for r in rows:
        r.setdefault("step_samples_s", [r["step_s"]] * 3)
    peer = {t.name: t for t in ts.gpu_step_targets(rows, "here")}[
        "GPU step: best BSR mode / compiled plain-PyTorch BSR"]
    assert peer.value == 1.1 and peer.where == "here; best: bsr_fast+compile"
    # no peer under CUDA graphs in the rows: no like-for-like CUDA-graph verdict
    assert not any("CUDA graphs" in t.name for t in ts.gpu_step_targets(rows, "here"))


def test_cuda_graph_target_compares_with_the_peer_under_cuda_graphs():
    """With the peer compiled under CUDA graphs among the rows, a verdict of its own compares
    the fastest ``+cudagraphs`` BSR mode with it (the paired ratio of that row), not with the
    peer compiled without graphs; hand-captured (``+graph``) and eager rows are not
    candidates for it."""
    ts = _import_bench("bench_train_step")
    rows = [dict(variant="bsr_autograd+cudagraphs", step_s=0.45, speedup_vs_peer_compiled=2.0,
                 speedup_vs_peer_cudagraphs=0.95),
            dict(variant="bsr_fast+cudagraphs", step_s=0.5, speedup_vs_peer_cudagraphs=0.9),
            dict(variant="bsr_lean+graph", step_s=0.3, speedup_vs_peer_cudagraphs=1.5),
            dict(variant="bsr_autograd", step_s=0.9),
            dict(variant="peer_bsr+cudagraphs", step_s=0.43)]
    for r in rows:
        r["step_samples_s"] = [r["step_s"]] * 3
    by_name = {t.name: t for t in ts.gpu_step_targets(rows, "here")}
    target = by_name[ts.CUDAGRAPHS_TARGET[0]]
    assert target.value == 0.95 and target.bound == 1.2 and target.op == ">="
    assert target.where == "here; best: bsr_autograd+cudagraphs"
    assert target.to_dict()["verdict"] == "FAIL"
    assert "GPU step under CUDA graphs: lean throughput / best BSR mode" not in by_name
    # lean under CUDA graphs: its throughput against the best CUDA-graphed mode, paired
    rows.append(dict(variant="bsr_lean+cudagraphs", step_s=0.5, step_samples_s=[0.5] * 3))
    lean = {t.name: t for t in ts.gpu_step_targets(rows, "here")}[
        "GPU step under CUDA graphs: lean throughput / best BSR mode"]
    assert lean.value == pytest.approx(0.9) and lean.to_dict()["verdict"] == "PASS"
    assert lean.where == "here; lean: bsr_lean+cudagraphs, best: bsr_autograd+cudagraphs"
    rows = [r for r in rows if r["variant"] in ("bsr_autograd", "peer_bsr+cudagraphs")]
    target = {t.name: t for t in ts.gpu_step_targets(rows, "here")}[ts.CUDAGRAPHS_TARGET[0]]
    assert target.value is None and "no BSR mode ran under CUDA graphs" in target.where


def test_gpu_step_targets_skip_untimed_rows_and_pair_the_cuda_graph_rounds():
    """A BSR row that failed (no step time) is not the best mode; under CUDA graphs, lean's
    throughput against the best mode is the median of per-round ratios best / lean (one slow
    round does not move it, as it would a mean), here below its 0.85 bound; lean not run
    eagerly or compiled: NOT MEASURED, saying so."""
    ts = _import_bench("bench_train_step")
    rows = [dict(variant="bsr_fast", step_s=None, step_samples_s=[], error="step: boom"),
            dict(variant="bsr_autograd", step_s=0.02, step_samples_s=[0.02] * 3,
                 speedup_vs_full=2.5),
            dict(variant="peer_bsr+cudagraphs", step_s=0.5, step_samples_s=[0.5] * 3),
            dict(variant="bsr_autograd+cudagraphs", step_s=0.4, step_samples_s=[0.4] * 3,
                 speedup_vs_peer_cudagraphs=1.25),
            dict(variant="bsr_lean+cudagraphs", step_s=0.5, step_samples_s=[0.5, 0.5, 0.2])]
    assert ts.best_bsr(rows)["variant"] == "bsr_autograd"
    got = {t.name: t for t in ts.gpu_step_targets(rows, "here")}
    assert got["GPU step: best BSR mode / timm full fine-tuning"].value == 2.5
    lean = got["GPU step under CUDA graphs: lean throughput / best BSR mode"]
    per_round = [0.4 / 0.5, 0.4 / 0.5, 0.4 / 0.2]
    assert lean.value == pytest.approx(statistics.median(per_round)) and lean.verdict == "FAIL"
    assert statistics.mean(per_round) >= 0.85  # a mean of the rounds would have passed
    eager_lean = got["GPU step: lean throughput / best BSR mode"]
    assert eager_lean.verdict == "NOT MEASURED" and "; lean did not run" in eager_lean.where


def test_train_step_cpu_targets_read_each_figure_against_its_bound():
    """The train_step section's CPU verdicts (``bench_train_step.targets``): saved MiB/image of
    lean, fast and compressed lean (<= 10, 20, 6), lean's training GFLOPs (<= 36), lean's speedup
    over full fine-tuning (>= 3.3), lean's and fast's step time over the eager formulation's
    (<= 1.15, 1.0), each read from its own figure; a failed reference is named beside the ratio
    it takes part in; the GPU ones are NOT MEASURED."""
    ts = _import_bench("bench_train_step")
    from benchmarks._suite import SuiteConfig
    rows = [dict(variant="bsr_lean", saved_mib_per_image=10.5, train_gflops_per_image=36.0,
                 speedup_vs_full=3.4, time_vs_eager=1.1, speedup_vs_eager=1 / 1.1),
            dict(variant="bsr_fast", saved_mib_per_image=19.0, time_vs_eager=1.02,
                 speedup_vs_eager=1 / 1.02),
            dict(variant="bsr_lean_bf16", saved_mib_per_image=5.0),
            dict(variant="eager_bsr", error="step: RuntimeError: boom")]
    got = {t["name"]: t for t in ts.targets(SuiteConfig(device="cpu"), rows)}
    cpu = {n: (t["value"], t["verdict"]) for n, t in got.items() if not n.startswith("GPU")}
    assert cpu == {"saved activations, lean": (10.5, "FAIL"),
                   "saved activations, fast": (19.0, "PASS"),
                   "saved activations, lean + bf16 (compressed)": (5.0, "PASS"),
                   "training FLOPs, lean": (36.0, "PASS"),
                   "CPU step: lean speedup over timm full fine-tuning": (3.4, "PASS"),
                   "CPU step: lean time / eager formulation time": (1.1, "PASS"),
                   "CPU step: fast time / eager formulation time": (1.02, "FAIL")}
    fast = got["CPU step: fast time / eager formulation time"]
    assert "eager_bsr failed: step: RuntimeError: boom" in fast["where"]
    assert "failed" not in got["saved activations, fast"]["where"]
    assert all(t["verdict"] == "NOT MEASURED" for n, t in got.items() if n.startswith("GPU"))


def test_train_step_rows_pair_the_rounds_of_each_ratio():
    """``bench_train_step._rows``: a row's step time is the median of its samples, img/s the
    batch over it, ``speedup_vs_<ref>`` the median of per-round ratios ref / variant (above 1:
    faster than ref), ``time_vs_eager`` the median of per-round ratios variant / eager
    formulation; a reference that was not timed gives None."""
    ts = _import_bench("bench_train_step")
    from benchmarks._suite import SuiteConfig
    from benchmarks._timing import Timing
    samples = {"full": [4.0, 9.0, 6.0], "eager_bsr": [0.5, 1.0, 2.0],
               "bsr_lean": [1.0, 2.0, 3.0]}
    res = dict(timings={v: Timing(v, s, 1) for v, s in samples.items()},
               digests=dict.fromkeys(samples), errors={}, peaks={}, graph_breaks={})
    cfg = SuiteConfig(device="cpu")
    lean = {r["variant"]: r for r in ts._rows(cfg, list(samples), res)}["bsr_lean"]
    assert lean["step_s"] == 2.0 and lean["images_per_s"] == pytest.approx(cfg.time_batch / 2.0)
    assert lean["speedup_vs_full"] == pytest.approx(statistics.median([4.0, 4.5, 2.0]))
    assert lean["speedup_vs_eager"] == pytest.approx(statistics.median([0.5, 0.5, 2 / 3]))
    assert lean["time_vs_eager"] == pytest.approx(statistics.median([2.0, 2.0, 1.5]))
    assert lean["speedup_vs_full_compiled"] is None and lean["step_samples_s"] == [1.0, 2.0, 3.0]


def test_step_table_shows_each_figure_in_its_column():
    """``step_table``: the step time in ms, img/s, each speedup under its own header (x full,
    x full compiled, x peer compiled, x eager formulation), an empty cell where not measured."""
    ts = _import_bench("bench_train_step")
    row = dict(variant="bsr_lean", label="lean", step_s=0.0125, images_per_s=1280.0,
               speedup_vs_full=4.1, speedup_vs_full_compiled=2.7, speedup_vs_peer_compiled=1.2,
               speedup_vs_eager=None)
    header, _, cells = [[c.strip() for c in ln.strip("|").split("|")]
                        for ln in ts.step_table([row]).splitlines()]
    got = dict(zip(header, cells))
    assert (got["variant"], got["step ms"], got["img/s"]) == ("lean", "12.5", "1280.0")
    assert (got["x full"], got["x full compiled"], got["x peer compiled"]) == (
        "4.10x", "2.70x", "1.20x")
    assert got["x eager formulation"] == ""


def test_bench_gpu_summary_names_the_parts_left_for_a_next_call():
    """A part that failed is listed with its error; the parts the deadline left out are also
    given as the command that runs them next (a second call on the device)."""
    bench_gpu = _import_bench("bench_gpu")
    md = bench_gpu.summarize({"env": {}, "parts": {
        "check": {"cases": [], "failures": 0}, "op": {"error": "RuntimeError: boom"},
        "sweep": {"error": "skipped: out of time", "hangs": []},
        "sac": {"error": "skipped: out of time", "hangs": []}}})
    assert "- part op: RuntimeError: boom" in md
    assert "--parts sweep,sac`" in md and "--parts op" not in md
    assert "next:" not in bench_gpu.summarize({"env": {}, "parts": {"op": {"error": "x"}}})


def test_bench_gpu_targets_read_the_parts():
    """bench_gpu's verdicts of issues 9 and 10: op figures per shape from op / op-compiled, step
    ratios from the step-compiled rows (best BSR mode: +graph and compressed lean left out), lean's
    peak from the eager step part; a missing part is NOT MEASURED with its error named."""
    bench_gpu = _import_bench("bench_gpu")
    row = f"fwd+bwd speedup vs {bench_gpu.ROW_PEER}"
    comp = f"forward speedup vs {bench_gpu.COMPILED_PEER}"
    def step_row(variant, s, **ratios):  # a step_rows row: what is not given was not measured
        return _step_row(variant, s, **{**dict.fromkeys(_STEP_FIGURES),
                                         "step_samples_s": [s * f for f in (0.9, 1.0, 1.1)],
                                         **ratios})

    step_compiled = [
        step_row("full", 0.05), step_row("peer_bsr+compile", 0.0145),
        step_row("bsr_autograd+compile", 0.012, speedup_vs_peer_compiled=1.21,
                 speedup_vs_full=4.1, speedup_vs_full_compiled=2.7),
        step_row("bsr_lean+compile", 0.015), step_row("bsr_lean+graph", 0.001)]
    results = {"env": {"device": "NVIDIA H100 80GB HBM3"}, "parts": {
        "op": {"ViT-B B=128": {"fraction_of_copy": 0.55, row: 1.9},
               "ViT-B B=32 N=577": {"fraction_of_copy": 0.29, row: 2.0}},
        "op-compiled": {"error": "RuntimeError: boom"},
        "step": {"rows": [step_row("bsr_lean", 0.02, peak_gib_above_model=1.04)]},
        "step-compiled": {"rows": step_compiled, "model": "ViT-B/16", "batch": 128}}}
    got = {(t.name, t.where.split(",")[0]): t for t in bench_gpu.targets(results)}
    frac = "drop forward: fraction of the measured copy bandwidth"
    assert got[(frac, "ViT-B B=128")].verdict == "PASS"
    assert got[(frac, "ViT-B B=32 N=577")].verdict == "FAIL"  # 0.29 < 0.3
    fb = "drop fwd+bwd: speedup vs CLS-row composite"
    assert got[(fb, "ViT-B B=128")].verdict == "FAIL"
    assert got[(fb, "ViT-B B=32 N=577")].verdict == "PASS"
    assert got[(fb, "ViT-S B=256")].verdict == "NOT MEASURED"
    compiled = [t for (name, _), t in got.items() if name.endswith("compiled CLS-row composite")]
    assert len(compiled) == 4 and all(t.verdict == "NOT MEASURED" for t in compiled)
    assert all("op-compiled: RuntimeError: boom" in t.where for t in compiled)
    assert {t.bound for t in compiled} == {2.5, 1.5}
    step = {name: t for (name, _), t in got.items() if name.startswith("GPU step")}
    assert step["GPU step: best BSR mode / compiled plain-PyTorch BSR"].value == 1.21
    assert step["GPU step: best BSR mode / compiled plain-PyTorch BSR"].verdict == "PASS"
    assert step["GPU step: best BSR mode / timm full fine-tuning"].verdict == "PASS"
    assert step["GPU step: best BSR mode / timm full fine-tuning compiled"].verdict == "FAIL"
    lean = step["GPU step: lean throughput / best BSR mode"]
    assert lean.value == pytest.approx(0.012 / 0.015) and lean.verdict == "FAIL"
    assert "best: bsr_autograd+compile" in lean.where
    peak = step["GPU step: lean peak memory above the resident model"]
    assert peak.value == 1.04 and "eager lean in part step" in peak.where
    md = bench_gpu.summarize(results)
    assert "## targets (issues 9 and 10)" in md and "PASS: GPU step: best BSR mode" in md
    # op-compiled measured: 2.5x at the three large shapes, 1.5x at B=8
    results["parts"]["op-compiled"] = {"ViT-B B=128": {comp: 2.6}, "ViT-B B=32 N=577": {comp: 2.4},
                                       "ViT-B B=8": {comp: 1.6}}
    got = {(t.name, t.where.split(",")[0]): t for t in bench_gpu.targets(results)}
    verdicts = {shape: t.verdict for (name, shape), t in got.items()
                if name.endswith("compiled CLS-row composite")}
    assert verdicts == {"ViT-B B=128": "PASS", "ViT-B B=32 N=577": "FAIL",
                        "ViT-S B=256": "NOT MEASURED", "ViT-B B=8": "PASS"}, verdicts
    nothing = bench_gpu.targets({"env": {}, "parts": {}})
    assert nothing and all(t.verdict == "NOT MEASURED" for t in nothing)


def test_bench_gpu_step_targets_need_a_compiled_row_of_step_compiled():
    """The step targets read step-compiled's rows only when it timed a compiled variant: when
    the deadline left it its eager rows alone (full, autograd, lean), the step part's rows
    (every eager mode, fast too) are read, so that the best mode is not chosen without fast."""
    bench_gpu = _import_bench("bench_gpu")

    skipped = "step: skipped: out of time (90 s left; a compiled build needs 104 s)"
    eager_only = [_step_row("full", 0.05, speedup_vs_full=1.0),
                  _step_row("bsr_autograd", 0.02, speedup_vs_full=2.5),
                  _step_row("bsr_lean", 0.025, speedup_vs_full=2.0),
                  _step_row("peer_bsr+compile", None, error=skipped),
                  _step_row("full+compile", None, error=skipped)]
    results = {"env": {"device": "NVIDIA H100 80GB HBM3"}, "parts": {
        "step": {"rows": [_step_row("full", 0.05, speedup_vs_full=1.0),
                          _step_row("bsr_fast", 0.0125, speedup_vs_full=4.0),
                          _step_row("bsr_autograd", 0.02, speedup_vs_full=2.5)],
                 "model": "ViT-B/16", "batch": 128},
        "step-compiled": {"rows": eager_only, "model": "ViT-B/16", "batch": 128}}}
    full = "GPU step: best BSR mode / timm full fine-tuning"
    got = {t.name: t for t in bench_gpu.targets(results)}[full]
    assert got.value == 4.0 and "ratios within part step; best: bsr_fast" in got.where
    # one compiled variant timed there: step-compiled's rows (paired with the compiled peer)
    eager_only[3] = _step_row("peer_bsr+compile", 0.015, speedup_vs_full=3.3)
    got = {t.name: t for t in bench_gpu.targets(results)}[full]
    assert got.value == 2.5
    assert "ratios within part step-compiled; best: bsr_autograd" in got.where


def test_bench_gpu_step_targets_do_not_take_a_hand_captured_row_for_a_compiled_one():
    """``is_compiled``: ``+compile`` and ``+cudagraphs`` are compiled, ``+graph`` (captured by
    hand) and eager variants are not; so a step-compiled part that timed a ``+graph`` row but no
    compiled variant leaves the step targets to the step part's rows (every eager mode)."""
    suite = _import_bench("_suite")
    bench_gpu = _import_bench("bench_gpu")
    variants = ("bsr_lean+compile", "bsr_fast+cudagraphs", "bsr_lean+graph", "bsr_lean", None)
    assert [suite.is_compiled(v) for v in variants] == [True, True, False, False, False]

    results = {"env": {"device": "NVIDIA H100 80GB HBM3"}, "parts": {
        "step": {"rows": [_step_row("bsr_fast", 0.0125, speedup_vs_full=4.0)],
                 "model": "ViT-B/16", "batch": 128},
        "step-compiled": {"rows": [_step_row("bsr_autograd", 0.02, speedup_vs_full=2.5),
                                   _step_row("bsr_lean+graph", 0.01, speedup_vs_full=5.0)],
                          "model": "ViT-B/16", "batch": 128}}}
    got = {t.name: t for t in bench_gpu.targets(results)}[
        "GPU step: best BSR mode / timm full fine-tuning"]
    assert got.value == 4.0 and "ratios within part step; best: bsr_fast" in got.where


def test_bench_gpu_smoke_targets_name_their_cpu_precision():
    """A --smoke run's results (device cpu: tiny CPU shapes, fp32) are described as such where
    their op verdicts are, not as a GPU's bf16 figures."""
    bench_gpu = _import_bench("bench_gpu")
    results = {"env": {"device": "cpu"},
               "parts": {"op": {"ViT-B B=128": {"fraction_of_copy": 0.6}}}}
    frac = next(t for t in bench_gpu.targets(results) if t.value is not None)
    assert frac.verdict == "PASS"
    assert frac.where == "ViT-B B=128, fp32 (--smoke: tiny CPU shapes), cpu"


def test_a_failed_section_keeps_its_targets_as_not_measured(monkeypatch):
    """A section that raised contributed no target, so its targets vanished from the list (the
    MoE one with it), and the README section's list of failed sections left out moe. Every
    section's targets now read NOT MEASURED, saying the section failed, and every failed
    section is named."""
    run = _import_bench("run")
    readme = _import_bench("readme_section")
    from benchmarks._suite import SuiteConfig
    cfg = SuiteConfig(device="cpu")
    want = {}
    for name in run.SECTIONS:
        mod = run._module(name)
        want[name] = [t["name"] for t in getattr(mod, "targets", lambda c, r: [])(cfg, [])]

        def boom(cfg, log=print, name=name):
            raise RuntimeError(f"{name} broke")
        monkeypatch.setattr(mod, "run", boom)
    assert want["moe"] and want["drop_tokens"] and want["train_step"]
    results = run.run_suite(cfg, log=lambda *a: None)
    got = [(t["name"], t["verdict"]) for t in results["targets"]]
    assert got == [(n, "NOT MEASURED") for s in run.SECTIONS for n in want[s]]
    moe = [t for t in results["targets"] if t["name"] in want["moe"]]
    assert all(t["where"].endswith("; the moe section failed") for t in moe)
    text = readme.performance_section(results)
    assert f"Sections that failed in this run: {', '.join(run.SECTIONS)}." in text


def test_bench_gpu_results_carry_the_date_of_the_measurement(tmp_path, monkeypatch):
    """results.md printed the day it was written, so a --merge on a later day re-dated the
    measurement, and results.json kept no date. The run records its date in env; the header
    prints it, a merge of calls of one day keeps it, of other days names each call's, and
    results stored without one say so."""
    bench_gpu = _import_bench("bench_gpu")
    md = bench_gpu.summarize({"env": {"device": "d", "date": "2026-11-27"}, "parts": {}})
    assert md.splitlines()[0].endswith("· 2026-11-27")
    assert bench_gpu.summarize({"env": {}, "parts": {}}).splitlines()[0].endswith(
        "· date not recorded")
    env = {"device": "NVIDIA H200", "torch": "2.11.0", "date": "2026-11-27"}
    runs = [{"env": env, "parts": {"check": {"cases": [1], "failures": 0}}},
            {"env": {**env, "date": "2026-11-29"}, "parts": {"sac": {"time": []}}}]
    merged = bench_gpu.merge_results(runs[:1] * 2)
    assert merged["env"]["date"] == "2026-11-27"
    md = bench_gpu.summarize(bench_gpu.merge_results(runs))
    assert md.splitlines()[0].endswith("· dates per call below")
    assert "- call 1: date: 2026-11-27" in md and "- call 2: date: 2026-11-29" in md
    monkeypatch.setattr(bench_gpu.time, "strftime", lambda fmt, *a: "2031-01-02")
    out = tmp_path / "r"
    assert bench_gpu.main(["--smoke", "--parts", "check", "--out", str(out)]) in (0, 1)
    assert json.loads((out / "results.json").read_text())["env"]["date"] == "2031-01-02"


def test_bench_gpu_merge_joins_two_calls(tmp_path, capsys):
    """``--merge``: each part from the last call that ran it (a part the second call skipped
    for time keeps the first call's result), the targets taken again from the merged parts (the
    op's from call 1, the step's from call 2: neither call alone measures both), each call's
    device and parts named; no results.json in a folder is a usage error."""
    bench_gpu = _import_bench("bench_gpu")
    row = f"fwd+bwd speedup vs {bench_gpu.ROW_PEER}"

    def step_row(variant, s, **figures):  # a step_rows row: what is not given was not measured
        return _step_row(variant, s, **{**dict.fromkeys(_STEP_FIGURES), **figures})

    skipped = {"error": "skipped: out of time"}
    first = {"env": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"}, "parts": {
        "check": {"cases": [1, 2], "failures": 0},
        "op": {"ViT-B B=128": {"fraction_of_copy": 0.55, row: 2.1}},
        "step": {"rows": [step_row("bsr_lean", 0.02, peak_gib_above_model=1.04)]},
        "step-compiled": skipped, "sac": skipped}}
    second = {"env": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"}, "parts": {
        "step": skipped,
        "step-compiled": {"rows": [step_row("full", 0.05, speedup_vs_full=1.0),
                                   step_row("peer_bsr+compile", 0.0145, speedup_vs_full=3.4),
                                   step_row("bsr_autograd+compile", 0.012, speedup_vs_full=4.2,
                                            speedup_vs_peer_compiled=1.21)],
                          "model": "ViT-B/16", "batch": 128},
        "sac": skipped}}
    folders = []
    for i, run in enumerate((first, second)):
        folders.append(tmp_path / f"call{i}")
        folders[-1].mkdir()
        (folders[-1] / "results.json").write_text(json.dumps(run))
    out = tmp_path / "merged"
    assert bench_gpu.main(["--merge", *map(str, folders), "--out", str(out)]) == 0
    merged = json.loads((out / "results.json").read_text())
    parts = merged["parts"]
    assert parts["check"] == first["parts"]["check"] and parts["op"] == first["parts"]["op"]
    assert parts["step"] == first["parts"]["step"]          # call 2 skipped it
    assert parts["step-compiled"] == second["parts"]["step-compiled"]
    assert parts["sac"] == skipped
    assert [c["parts"] for c in merged["calls"]] == [["check", "op", "step", "sac"],
                                                    ["step-compiled"]]
    assert merged["env"] == {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"}
    got = {t["name"]: t for t in merged["targets"]}
    assert got["GPU step: best BSR mode / compiled plain-PyTorch BSR"]["verdict"] == "PASS"
    assert got["GPU step: lean peak memory above the resident model"]["value"] == 1.04
    for run in (first, second):   # neither call alone has both verdicts
        alone = {t.name: t for t in bench_gpu.targets(run)}
        assert "NOT MEASURED" in {
            alone["GPU step: best BSR mode / compiled plain-PyTorch BSR"].verdict,
            alone["GPU step: lean peak memory above the resident model"].verdict}
    md = (out / "results.md").read_text()
    assert ("Merged from calls (the header's device and software in each): 1: check, op, "
            "step, sac; 2: step-compiled") in md
    assert md in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_gpu.main(["--merge", str(tmp_path), "--out", str(out)])
    with pytest.raises(ValueError, match="at least one call"):
        bench_gpu.merge_results([])
    # a --smoke call's tiny CPU figures replaced the H100's step rows (a PASS where the GPU's
    # own verdict was FAIL); a results.json of benchmarks.run merged into "None" headers
    smoke = {"env": {"device": "cpu", "torch": "2.14.1"}, "parts": {
        "step-compiled": second["parts"]["step-compiled"]}}
    with pytest.raises(ValueError, match="cannot merge CPU"):
        bench_gpu.merge_results([first, smoke])
    with pytest.raises(ValueError, match="call 2: not a bench_gpu results.json"):
        bench_gpu.merge_results([first, {"meta": {}, "sections": {}}])
    (folders[1] / "results.json").write_text(json.dumps(smoke))
    with pytest.raises(SystemExit):
        bench_gpu.main(["--merge", *map(str, folders), "--out", str(out)])
    assert "cannot merge CPU" in capsys.readouterr().err


def test_bench_gpu_retries_reuse_what_was_measured(tmp_path, monkeypatch):
    """run_part's policy on a worker's exit (children replaced by stand-ins that save what a
    worker saves): a hang in an eager block retries without that candidate and keeps inductor's
    compile threads; a first hang in a compilation retries it compiling in-process; a worker its
    own clock stopped (the deadline, the part's limit) is not retried; every retry finds what the
    earlier attempt saved (Worker.previous / reuse), and the result keeps it. The parent waits
    for a worker until its part's limit (or the deadline) plus a grace period."""
    from types import SimpleNamespace
    bench_gpu = _import_bench("bench_gpu")
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "4")
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS")  # restored when the test ends
    script, seen = [], []

    def fake_run(cmd, timeout):
        arg = lambda name: cmd[cmd.index(name) + 1]  # noqa: E731
        w = bench_gpu.Worker(arg("--worker"), arg("--out"), [x for x in arg("--skip").split("|")
                                                             if x], 30.0, float("inf"))
        seen.append(dict(timeout=timeout, skip=sorted(w.skip), previous=dict(w.previous),
                         threads=os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")))
        return SimpleNamespace(returncode=script.pop(0)(w))

    def hang(label, compiling, status=1, **saved):
        def child(w):
            for k, v in saved.items():
                w.put(k, v)
            w.state.update(running=label, compiling=compiling, stop="at the deadline")
            w.save()
            return status
        return child

    def finish(**saved):
        def child(w):
            for k, v in saved.items():
                w.put(k, v)
            return 0
        return child

    monkeypatch.setattr(bench_gpu.subprocess, "run", fake_run)
    args = SimpleNamespace(out=str(tmp_path), compile_timeout_s=30.0, smoke=True)
    (tmp_path / "part-profile.json").write_text('{"result": {"rows": ["an earlier run"]}}')
    script[:] = [hang("peer_bsr", False, rows=["full"]), finish(rows=["full", "bsr_lean"])]
    res = bench_gpu.run_part("profile", args, time.time() + 300)
    assert seen[0]["previous"] == {}  # an earlier run's file is not this run's attempt
    assert seen[1]["skip"] == ["peer_bsr"] and seen[1]["previous"] == {"rows": ["full"]}
    assert seen[1]["threads"] is None  # an eager hang: inductor's compile threads as they were
    assert res["rows"] == ["full", "bsr_lean"] and "error" not in res
    assert res["hangs"] == [{"while": "peer_bsr", "exit": 1, "then": "retried without 'peer_bsr'",
                             "stacks": bench_gpu.stacks_file("profile", "peer_bsr")}]
    assert 300 < seen[0]["timeout"] <= 300 + bench_gpu.KILL_GRACE_S

    seen.clear()
    script[:] = [hang("full+compile", True, rows=["full"]),
                 hang("bsr_autograd+compile", True, bench_gpu.STOPPED, rows=["full", "peer"])]
    res = bench_gpu.run_part("step-compiled", args, time.time() + 300)
    assert [s["threads"] for s in seen] == [None, "1"] and seen[1]["skip"] == []
    assert seen[1]["previous"] == {"rows": ["full"]}
    assert res["rows"] == ["full", "peer"]
    assert res["error"] == "stopped at the deadline while running 'bsr_autograd+compile'"
    assert res["hangs"][0]["then"] == "retried with TORCHINDUCTOR_COMPILE_THREADS=1"
    assert res["hangs"][1]["stacks"] == bench_gpu.stacks_file("step-compiled",
                                                              bench_gpu.TIME_LIMIT)
    assert "then" not in res["hangs"][1]

    seen.clear()
    script[:] = [finish(cases=[])]
    bench_gpu.run_part("check", args, time.time() + 300)
    limit = bench_gpu.PART_LIMITS_S["check"]
    assert seen[0]["timeout"] == pytest.approx(limit + bench_gpu.KILL_GRACE_S)


def test_bench_gpu_worker_stops_on_the_parents_clock(tmp_path, monkeypatch):
    """The parent gives a child the time it must stop at (--stop-at: the part's limit counted
    from the spawn, or the deadline if sooner) and kills it KILL_GRACE_S after that; the child
    stops at that time, not at its limit counted from its own start (after its imports and
    CUDA init, 10-30 s on a fresh machine, when the parent would have killed it first)."""
    import contextlib
    from types import SimpleNamespace
    bench_gpu = _import_bench("bench_gpu")
    seen = []

    def fake_run(cmd, timeout):
        seen.append(dict(stop_at=float(cmd[cmd.index("--stop-at") + 1]), timeout=timeout,
                         now=time.time()))
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(bench_gpu.subprocess, "run", fake_run)
    args = SimpleNamespace(out=str(tmp_path), compile_timeout_s=30.0, smoke=True)
    limit = bench_gpu.PART_LIMITS_S["check"]
    for deadline_in, stop_in in ((600.0, limit), (60.0, 60.0)):
        seen.clear()
        start = time.time()
        bench_gpu.run_part("check", args, start + deadline_in)
        (s,) = seen
        assert start + stop_in <= s["stop_at"] <= s["now"] + stop_in
        assert s["timeout"] == pytest.approx(s["stop_at"] - s["now"] + bench_gpu.KILL_GRACE_S,
                                             abs=0.5)
    # the child: its clock ends at --stop-at (a stand-in for the clock records its length)
    clocks = []

    def expiring(path, seconds, header, status, backstop=False):
        clocks.append((seconds, header, status))
        return contextlib.nullcontext()

    monkeypatch.setattr(bench_gpu, "expiring", expiring)
    monkeypatch.setattr(bench_gpu, "part_check", lambda cuda, device: {"cases": []})
    monkeypatch.setattr(bench_gpu, "WORKER", None)
    for stop_in, why in ((42.0, f"at its {limit:.0f} s time limit"), (300.0, "at the deadline")):
        clocks.clear()
        start = time.time()  # the parent's stop: its limit's end, or the deadline if sooner
        state = bench_gpu.run_worker("check", SimpleNamespace(
            out=str(tmp_path), skip="", compile_timeout_s=30.0, smoke=True, reserve_s=0.0,
            build_s=0.0, probe_pool=False, deadline_at=start + 300.0, stop_at=start + stop_in))
        (seconds, header, status), = clocks
        assert stop_in - 5 < seconds <= stop_in and status == bench_gpu.STOPPED
        assert header == f"Stopped {why}" and state["stop"] == why
        assert state["result"] == {"cases": []}


def test_bench_gpu_run_counts_from_the_process_start(tmp_path, monkeypatch):
    """The run's deadline counts from its process's start (the imports before main, a cold
    torch import 10-30 s on a fresh machine, count against the device's hard limit too), read
    from /proc on Linux, now where it cannot be read; main called with arguments (not the
    command line) counts from the call."""
    bench_gpu = _import_bench("bench_gpu")
    code = ("import time; time.sleep(2); from benchmarks.bench_gpu import process_start_time; "
            "print(time.time() - process_start_time())")
    age = float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                               text=True, timeout=300, check=True).stdout)
    if sys.platform.startswith("linux"):
        assert 2.0 <= age < 300.0
    with monkeypatch.context() as m:  # no /proc: now
        m.setattr(bench_gpu, "open", _no_proc, raising=False)
        assert abs(bench_gpu.process_start_time() - time.time()) < 1.0

    seen = []

    def run_part(part, args, deadline_at, *a):
        seen.append(deadline_at)
        return {"cases": [], "failures": 0, "hangs": []}

    monkeypatch.setattr(bench_gpu, "run_part", run_part)
    monkeypatch.setattr(bench_gpu, "T0", bench_gpu.T0)  # main sets it: restored at the end
    for name in ("BSR_BENCH_T0", "TRITON_INTERPRET"):
        monkeypatch.setenv(name, "0")
    started = time.time() - 100.0
    monkeypatch.setattr(bench_gpu, "process_start_time", lambda: started)
    argv = ["--out", str(tmp_path), "--parts", "check", "--smoke"]
    monkeypatch.setattr(sys, "argv", ["bench_gpu"] + argv)
    assert bench_gpu.main() == 0
    assert seen == [started + 540.0] and bench_gpu.T0 == started
    assert os.environ["BSR_BENCH_T0"] == str(started)  # the children's clock
    seen.clear()
    now = time.time()
    bench_gpu.main(argv + ["--deadline-s", "60"])
    assert now + 60 <= seen[0] <= time.time() + 60


def _no_proc(*args):
    raise OSError("no /proc here")


def test_bench_gpu_compile_pool_probe_switches_to_in_process_compiles(tmp_path, monkeypatch):
    """The compile pool probe, once per run (children replaced by stand-ins): the parent asks
    children to probe until one has; a probe that hangs is a hung compilation, so the part is
    retried with TORCHINDUCTOR_COMPILE_THREADS=1 at once and every later child inherits it (no
    more probes); the outcome goes to results' env and to the summary. A probe that finishes is
    recorded with its time and ends the probing."""
    from types import SimpleNamespace
    bench_gpu = _import_bench("bench_gpu")
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "4")
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS")  # restored when the test ends
    script, seen = [], []

    def fake_run(cmd, timeout):
        arg = lambda name: cmd[cmd.index(name) + 1]  # noqa: E731
        w = bench_gpu.Worker(arg("--worker"), arg("--out"), [], 30.0, float("inf"))
        seen.append(dict(part=arg("--worker"), probe="--probe-pool" in cmd,
                         threads=os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")))
        return SimpleNamespace(returncode=script.pop(0)(w))

    def probe_hangs(w):  # what Worker.probe leaves when its watchdog ends the process
        w.state.update(running=bench_gpu.POOL_PROBE, compiling=True)
        w.save()
        return 1

    def finish(w):
        w.put("rows", [])
        return 0

    monkeypatch.setattr(bench_gpu.subprocess, "run", fake_run)
    args = SimpleNamespace(out=str(tmp_path), compile_timeout_s=180.0, smoke=True)
    probe = {}
    script[:] = [finish, probe_hangs, finish, finish]
    bench_gpu.run_part("step", args, time.time() + 300, probe=probe)  # compiles nothing
    res = bench_gpu.run_part("op-compiled", args, time.time() + 300, probe=probe)
    bench_gpu.run_part("step-compiled", args, time.time() + 300, probe=probe)
    assert [(s["part"], s["probe"], s["threads"]) for s in seen] == [
        ("step", True, None), ("op-compiled", True, None), ("op-compiled", False, "1"),
        ("step-compiled", False, "1")]
    assert res["hangs"] == [{"while": bench_gpu.POOL_PROBE, "exit": 1,
                             "stacks": bench_gpu.stacks_file("op-compiled", bench_gpu.POOL_PROBE),
                             "then": "retried with TORCHINDUCTOR_COMPILE_THREADS=1"}]
    assert probe == {"part": "op-compiled", "hung": True, "limit_s": 60.0,
                     "stacks": res["hangs"][0]["stacks"], "threads": "1 from then on"}
    md = bench_gpu.summarize({"env": {"compile_pool_probe": probe}, "parts": {}})
    assert ("compile pool probe (part op-compiled): did not finish in 60 s (stacks: "
            "stacks-op-compiled-compile_pool_probe.txt): TORCHINDUCTOR_COMPILE_THREADS=1") in md

    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS")
    seen.clear()
    probe = {}

    def probe_finishes(w):
        w.state["pool_probe"] = {"seconds": 4.2, "pool_ready_s": 3.0, "part": w.part,
                                 "threads": "inductor's default"}
        return finish(w)

    script[:] = [probe_finishes, finish]
    bench_gpu.run_part("op-compiled", args, time.time() + 300, probe=probe)
    bench_gpu.run_part("step-compiled", args, time.time() + 300, probe=probe)
    assert [(s["probe"], s["threads"]) for s in seen] == [(True, None), (False, None)]
    assert probe["seconds"] == 4.2
    md = bench_gpu.summarize({"env": {"compile_pool_probe": probe}, "parts": {}})
    assert ("compile pool probe (part op-compiled): a trivial compile ran in 4.2 s (pool ready "
            "after 3.0 s)") in md


def test_bench_gpu_worker_probes_the_pool_before_its_first_compilation(tmp_path, monkeypatch):
    """Worker.watchdog runs the probe (a stand-in here) once, before the first compilation and
    not before an eager block, under a watchdog of its own recorded as a compilation (what the
    parent reads when it hangs); its outcome, or its error, is saved in the part's state."""
    bench_gpu = _import_bench("bench_gpu")
    calls = []

    def probe(device):
        state = json.load(open(tmp_path / "part-step-compiled.json"))
        calls.append((device, state["running"], state["compiling"]))
        return {"seconds": 1.5}

    monkeypatch.setattr(bench_gpu, "probe_compile_pool", probe)
    w = bench_gpu.Worker("step-compiled", str(tmp_path), [], 30.0, float("inf"),
                         probe_pool=True)
    with w.watchdog("full", 180):  # eager: no probe
        pass
    assert calls == []
    with w.watchdog("full+compile"):
        assert json.load(open(w.path))["running"] == "full+compile"
    with w.watchdog("peer_bsr+compile"):
        pass
    assert calls == [("cpu", bench_gpu.POOL_PROBE, True)]
    saved = json.load(open(w.path))["pool_probe"]
    assert saved == {"seconds": 1.5, "part": "step-compiled", "limit_s": 30.0,
                     "threads": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS",
                                               "inductor's default")}
    monkeypatch.setattr(bench_gpu, "probe_compile_pool", lambda d: 1 / 0)
    w = bench_gpu.Worker("step-compiled", str(tmp_path), [], 300.0, float("inf"),
                         probe_pool=True)
    with w.watchdog("full+compile"):
        pass
    assert w.state["pool_probe"]["error"].startswith("ZeroDivisionError")
    assert w.state["pool_probe"]["limit_s"] == bench_gpu.POOL_PROBE_S


def test_bench_gpu_expects_compiled_builds_from_the_run_so_far(tmp_path):
    """The slowest compiled step build measured so far in the run (step rows, SAC entries; not
    eager or hand-captured ones) is what a step part and op-compiled's reserve expect of the
    next; a part's retry also counts what its earlier attempt built."""
    bench_gpu = _import_bench("bench_gpu")
    ts = _import_bench("bench_train_step")
    parts = {"step": {"rows": [{"variant": "full", "build_s": 500.0}]},
             "step-compiled": {"rows": [{"variant": "peer_bsr+compile", "build_s": 40.0},
                                        {"variant": "bsr_lean+graph", "build_s": 300.0},
                                        {"variant": "full+compile", "build_s": None}]},
             "sac": {"time": {"lean+compile": {"build_s": 55.0}, "lean": {"build_s": 99.0}}},
             "check": {"error": "x"}}
    assert bench_gpu.slowest_compiled_build(parts) == 55.0
    assert bench_gpu.slowest_compiled_build({"step": parts["step"]}) is None
    assert bench_gpu._compiled_step_reserve(None) == pytest.approx(
        30 + ts.compiled_build_room_s() + bench_gpu.STEP_TIMING_RESERVE_S)
    assert bench_gpu._compiled_step_reserve(55.0) == pytest.approx(30 + 1.3 * 55 + 60)
    (tmp_path / "part-step-compiled.json").write_text(json.dumps(
        {"result": {"rows": parts["step-compiled"]["rows"]}}))
    w = bench_gpu.Worker("step-compiled", str(tmp_path), [], 30.0, float("inf"), build_s=20.0)
    assert w.build_s == 40.0
    assert bench_gpu.Worker("sac", str(tmp_path), [], 30.0, float("inf")).build_s is None


def test_bench_gpu_profile_goes_on_past_a_hung_variant(tmp_path, monkeypatch):
    """The profile part: a variant that hung in an earlier attempt gets a row with the error and
    the variants after it are still profiled; rows the earlier attempt measured are kept."""
    bench_gpu = _import_bench("bench_gpu")
    ts = _import_bench("bench_train_step")
    (tmp_path / "part-profile.json").write_text(json.dumps({"result": {"rows": [
        {"variant": "full", "wall_ms": 1.0}]}}))
    w = bench_gpu.Worker("profile", str(tmp_path), ["peer_bsr"], 30.0, time.time() + 300)
    monkeypatch.setattr(bench_gpu, "WORKER", w)
    monkeypatch.setattr(ts, "step_profile", lambda cfg, v: {"variant": v, "wall_ms": 2.0})
    rows = bench_gpu.part_profile(False, "cpu")["rows"]
    # on CPU the eager variants: the compiled ones are profiled on CUDA
    assert [r["variant"] for r in rows] == [v for v in bench_gpu.PROFILED_STEPS if "+" not in v]
    assert any("+compile" in v for v in bench_gpu.PROFILED_STEPS)
    assert rows[0] == {"variant": "full", "wall_ms": 1.0}  # kept
    assert rows[1]["error"].startswith("skipped: hung in an earlier attempt (stacks-profile-")
    assert all(r["wall_ms"] == 2.0 for r in rows[2:])


def test_bench_gpu_op_compiled_keeps_time_for_the_step_parts(tmp_path, monkeypatch):
    """op-compiled: a shape an earlier attempt measured is kept (its copy bandwidth too); after
    the first shape none starts with less than the reserve left for the later parts, and those
    left out are named in the part, in the summary and in the command for a next call."""
    bench_gpu = _import_bench("bench_gpu")
    measured = {"forward": {"bsr cpp": {"ms": 1.0}}, "fwd+bwd": {"bsr cpp": {"ms": 2.0}},
                "errors": {}}
    (tmp_path / "part-op-compiled.json").write_text(json.dumps({"result": {
        "copy_gbps": 12.5, "tiny": measured}}))
    w = bench_gpu.Worker("op-compiled", str(tmp_path), [], 30.0, time.time() + 300,
                         reserve_s=1000.0)
    monkeypatch.setattr(bench_gpu, "WORKER", w)
    monkeypatch.setattr(bench_gpu, "SMOKE_OP_SHAPES", [("tiny", 4, 2, 17, 8),
                                                        ("tiny N=33", 4, 2, 33, 8)])
    out = bench_gpu.part_op(False, "cpu", compiled=True)
    assert out["copy_gbps"] == 12.5 and out["tiny"] == measured
    assert out["skipped_for_time"] == ["tiny N=33"]
    assert out["tiny N=33"]["error"].startswith("skipped: out of time (")
    assert "1000 s kept for the later parts" in out["tiny N=33"]["error"]
    md = bench_gpu.summarize({"env": {}, "parts": {"op-compiled": out, "step-compiled": {
        "rows": [{"variant": "full", "label": "full", "step_s": 0.1, "images_per_s": 1.0,
                  "speedup_vs_full": 1.0, "speedup_vs_full_compiled": None,
                  "speedup_vs_peer_compiled": None, "speedup_vs_eager": None},
                 {"variant": "full+compile", "label": "full, compiled", "step_s": None,
                  "images_per_s": None, "speedup_vs_full": None,
                  "speedup_vs_full_compiled": None, "speedup_vs_peer_compiled": None,
                  "speedup_vs_eager": None, "error": "step: skipped: out of time (...)"}]}}})
    assert "- part op-compiled: left out for time: tiny N=33" in md
    assert "- part step-compiled: left out for time: full+compile" in md
    assert "--parts op-compiled,step-compiled`" in md


def test_bench_gpu_op_compiled_starts_a_shape_only_when_it_ends_before_the_reserve(
        tmp_path, monkeypatch):
    """op-compiled starts a shape after the first only when the reserve for step-compiled and
    the longest shape so far (its seconds, also of a shape an earlier attempt measured) are
    left: a shape started just above the reserve ran to its end and left step-compiled too
    little for any compiled build. A fake clock: each timing of a shape's two passes takes
    15 s (30 s a shape); torch.compile is the identity."""
    from types import SimpleNamespace
    bench_gpu = _import_bench("bench_gpu")
    clock = [1000.0]
    monkeypatch.setattr(bench_gpu, "time", SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    real_bench = bench_gpu.bench

    def bench(fns, cuda, **kw):
        clock[0] += 15.0
        return real_bench(fns, cuda, **kw)
    monkeypatch.setattr(bench_gpu, "bench", bench)
    monkeypatch.setattr(bench_gpu, "SMOKE_OP_SHAPES", [("tiny", 4, 2, 17, 8),
                                                        ("tiny 2", 4, 2, 9, 8),
                                                        ("tiny 3", 4, 2, 33, 8)])

    def attempt(deadline):
        w = bench_gpu.Worker("op-compiled", str(tmp_path), [], 30.0, deadline, reserve_s=100.0)
        monkeypatch.setattr(bench_gpu, "WORKER", w)
        return bench_gpu.part_op(False, "cpu", compiled=True)

    out = attempt(1160.0)
    # tiny: always (ends with 130 s left); tiny 2: 130 >= 100 + 30, ends with 100 s left;
    # tiny 3: 100 < 130 (the old rule, 100 >= 100, started it and left 70 s)
    assert out["skipped_for_time"] == ["tiny 3"]
    assert out["tiny"]["seconds"] == 30.0 and out["tiny 2"]["seconds"] == 30.0
    assert out["tiny 3"]["error"] == ("skipped: out of time (100 s left, 100 s kept for the "
                                      "later parts, a shape takes 30 s)")
    assert 1160.0 - clock[0] >= 100.0
    # a retry: the shapes measured before are kept, and their seconds still count
    clock[0] = 1000.0
    out = attempt(1129.0)
    assert out["skipped_for_time"] == ["tiny 3"] and clock[0] == 1000.0


def test_bench_gpu_op_compiled_hang_in_fwd_bwd_keeps_the_forward(tmp_path, monkeypatch):
    """op-compiled: when the compiled peer's fwd+bwd compilation hangs (a stand-in: its watchdog
    block ends the attempt, as the real one ends the process), the shape's forward was saved
    before, and the retry without the label that hung keeps it and measures the fwd+bwd of the
    others; the peer's forward is still compiled and compared at the later shapes (the two
    passes have separate labels). torch.compile is the identity here: no compiler runs."""
    import contextlib
    bench_gpu = _import_bench("bench_gpu")
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(bench_gpu, "SMOKE_OP_SHAPES", [("tiny", 4, 2, 17, 8),
                                                        ("tiny N=33", 4, 2, 33, 8)])

    class Hung(BaseException):
        pass

    def attempt(skip, hang_at=None):
        w = bench_gpu.Worker("op-compiled", str(tmp_path), skip, 30.0, time.time() + 300)
        monkeypatch.setattr(bench_gpu, "WORKER", w)
        real, labels = w.watchdog, []

        @contextlib.contextmanager
        def watchdog(label, *a, **kw):
            with real(label, *a, **kw):
                labels.append(label)
                if len(labels) == hang_at:
                    raise Hung(label)
                yield
        monkeypatch.setattr(w, "watchdog", watchdog)
        try:
            return bench_gpu.part_op(False, "cpu", compiled=True), labels
        except Hung:
            return None, labels

    fwd = f"forward speedup vs {bench_gpu.COMPILED_PEER}"
    fb = f"fwd+bwd speedup vs {bench_gpu.COMPILED_PEER}"
    out, labels = attempt([], hang_at=2)  # the first shape's forward, then its fwd+bwd
    assert out is None and labels[0] == bench_gpu.COMPILED_PEER
    hung = labels[1]
    assert hung != bench_gpu.COMPILED_PEER
    saved = json.load(open(tmp_path / "part-op-compiled.json"))["result"]["tiny"]
    assert saved[fwd] > 0 and "fwd+bwd" not in saved
    out, labels = attempt([hung])
    assert labels == [bench_gpu.COMPILED_PEER]  # the later shape's forward compile
    for shape in ("tiny", "tiny N=33"):
        res = out[shape]
        assert res[fwd] > 0 and fb not in res, shape
        assert res[f"fwd+bwd speedup vs {bench_gpu.ROW_PEER}"] > 0
        assert "hung in an earlier attempt" in res["errors"][
            f"{bench_gpu.COMPILED_PEER} (fwd+bwd)"]
    assert out["tiny"]["forward"] == saved["forward"]  # reused, not measured again


def test_bench_gpu_forward_ratios_per_peer_from_graphs_or_eager_calls():
    """Forward ratios of a shape: per peer from the CUDA-graph replays when both ours and that
    peer were captured, else from the eager calls of both (a peer whose capture failed keeps
    its ratio); our own time and bandwidth from our replays when captured. The table marks a
    ratio from eager calls."""
    bench_gpu = _import_bench("bench_gpu")
    ours, eager, row = "bsr triton", bench_gpu.EAGER_PEER, bench_gpu.ROW_PEER
    res = {"min_bytes": 2e6,
           "forward": {ours: {"ms": 1.0}, eager: {"ms": 8.0}, row: {"ms": 3.0}},
           "forward_graph": {ours: {"ms": 0.5}, eager: {"ms": 4.0},
                             row: {"error": "RuntimeError: capture failed"}}}
    bench_gpu.forward_figures(res, ours, [eager, row], copy_gbps=8.0)
    assert res["forward_from"] == "forward_graph"
    assert res["gbps"] == pytest.approx(4.0) and res["fraction_of_copy"] == pytest.approx(0.5)
    assert res[f"forward speedup vs {eager}"] == pytest.approx(8.0)  # 4.0 / 0.5, replays
    assert res[f"forward speedup vs {row}"] == pytest.approx(3.0)  # 3.0 / 1.0, eager calls
    assert res["forward_ratio_from"] == {eager: "forward_graph", row: "forward"}
    md = bench_gpu.summarize({"env": {}, "parts": {"op": {"copy_gbps": 8.0, "ViT-B B=128": res}}})
    line = next(ln for ln in md.splitlines() if ln.startswith("| ViT-B B=128 |"))
    assert "| 500.0 | 50% | 8.00× | 3.00× (eager calls) |" in line, line
    # ours not captured: every figure from the eager calls
    res = {"min_bytes": 2e6, "forward": {ours: {"ms": 1.0}, row: {"ms": 3.0}},
           "forward_graph": {ours: {"error": "x"}, row: {"ms": 0.1}}}
    bench_gpu.forward_figures(res, ours, [row], copy_gbps=8.0)
    assert res["forward_from"] == "forward" and res["gbps"] == pytest.approx(2.0)
    assert res[f"forward speedup vs {row}"] == pytest.approx(3.0)
    assert res["forward_ratio_from"] == {row: "forward"}


def test_bench_gpu_watchdog_dumps_every_frame_of_a_busy_thread(tmp_path):
    """The watchdog's stack dump reads frames under the GIL (faulthandler's watchdog, reading
    them without it, died mid-dump on a busy compile and left a truncated file): a thread deep
    in a recursion (past faulthandler's 100 frames) that is still running appears whole."""
    import threading
    bench_gpu = _import_bench("bench_gpu")
    ready, stop = threading.Event(), []

    def deep(n):
        if n:
            return deep(n - 1)
        ready.set()
        while not stop:   # busy, not blocked, and in no Python frame above this one (an
            sum(range(100))   # Event.is_set() here was the top frame 1 dump in ~40)

    t = threading.Thread(target=deep, args=(150,), name="busy")
    t.start()
    try:
        assert ready.wait(10)
        with open(tmp_path / "stacks.txt", "w") as f:
            bench_gpu.dump_stacks(f.fileno(), "Timeout (1 s) while running 'x'")
    finally:
        stop.append(True)
        t.join()
    text = (tmp_path / "stacks.txt").read_text()
    assert text.startswith("Timeout (1 s) while running 'x'\n")
    busy = text.split("(busy) (most recent call first):\n")[1].split("\n\n")[0].splitlines()
    assert sum(" in deep" in line for line in busy) == 151, busy[:5]
    assert busy[0].startswith(f'  File "{__file__}", line ') and busy[0].endswith(" in deep")
    assert "in test_bench_gpu_watchdog_dumps" not in text  # the dumping thread is left out


def test_bench_gpu_watchdog_clears_a_block_that_raised(tmp_path):
    """A watched block that raises (a compile error, an OOM) is not left 'running': a later crash
    outside any watched block must not be blamed on it (run_part would retry or skip the wrong
    candidate); it leaves no stacks file, and a block that finished leaves none either."""
    import json as json_
    bench_gpu = _import_bench("bench_gpu")
    w = bench_gpu.Worker("op", str(tmp_path), [], 30.0, float("inf"))
    with pytest.raises(ValueError, match="boom"):
        with w.watchdog("bad candidate"):
            assert json_.load(open(w.path))["running"] == "bad candidate"
            raise ValueError("boom")
    with w.watchdog("good candidate"):
        pass
    assert json_.load(open(w.path))["running"] is None
    assert not list(tmp_path.glob("stacks-*"))
    with pytest.raises(bench_gpu.Skipped):
        with bench_gpu.Worker("op", str(tmp_path), ["x"], 30.0, 0.0).watchdog("x"):
            pass


def _triton_interpreter_problem():
    from bsr_kernels.ops.triton_backend import _TRITON_ERROR, interpreter_problem
    return _TRITON_ERROR or interpreter_problem()


def test_sac_probe_is_exact_and_counts_what_profile_counts():
    """benchmarks/probe_sac.py (lean/fast as selective checkpointing, an experiment): the same
    float64 gradients as autograd mode, and its live-storage memory measure agrees with
    bsr_kernels.profile on the library's modes (SAC keeps its saved outputs where profile's
    hooks do not see them, which is why the probe counts live storages); the SAC forms keep
    more than lean/fast only by the drop outputs they save, and less than autograd mode."""
    probe = _import_bench("probe_sac")
    exact = probe.check_exact()
    for mode in ("sac_lean", "sac_fast"):
        assert exact[mode]["same_parameters"] and exact[mode]["max_abs_grad_diff"] < 1e-12
    mem = probe.check_memory(quick=True)
    for mode in ("autograd", "lean", "fast"):
        assert mem[mode]["live_mib_per_image"] == pytest.approx(
            mem[mode]["profile_mib_per_image"], rel=0.01), mode
    assert mem["lean"]["live_mib_per_image"] < mem["sac_lean"]["live_mib_per_image"] \
        < mem["sac_fast"]["live_mib_per_image"] < mem["autograd"]["live_mib_per_image"]
    assert mem["sac_lean"]["live_mib_per_image"] < 1.2 * mem["lean"]["live_mib_per_image"]
    with pytest.raises(ValueError, match="mode"):
        probe.sac_model(torch.nn.Linear(2, 2), "sac_turbo")


def test_sac_probe_names_the_reference_of_its_ratios(monkeypatch):
    """probe_sac's step ratios are against compiled autograd mode, or against eager autograd
    where that was not timed (left out for time): each row names its reference and the
    bench_gpu summary says which (the column read 'x autograd compiled' either way). The
    timer is a stand-in: no model is built."""
    probe = _import_bench("probe_sac")
    ts = _import_bench("bench_train_step")
    bench_gpu = _import_bench("bench_gpu")
    timing = _import_bench("_timing")
    suite = _import_bench("_suite")
    timed, calls = {}, []

    def time_steps(cfg, variants, log, build=None, report=None, **kw):
        calls.append(tuple(variants))
        return dict(timings={v: timing.Timing(v, [s] * 3, 1) for v, s in timed.items()
                             if v in variants},
                    peaks={}, errors={"autograd+compile": "skipped: out of time"}, build_s={},
                    graph_breaks={})

    monkeypatch.setattr(ts, "time_steps", time_steps)
    cfg = suite.SuiteConfig(tiny=True, quick=True)
    timed.update(autograd=0.02, lean=0.04)
    rows = probe.time_modes(cfg)
    assert rows["lean"]["reference"] == "autograd"
    assert rows["lean"]["speed_vs_reference"] == pytest.approx(0.5)
    md = bench_gpu.summarize({"env": {}, "parts": {"sac": {"time": rows}}})
    assert "autograd+compile was not timed: the ratios are against eager autograd" in md
    assert "| model | ms/step | × autograd | peak GiB above model |" in md
    timed["autograd+compile"] = 0.01
    rows = probe.time_modes(cfg)
    assert rows["lean"]["reference"] == "autograd+compile"
    assert rows["lean"]["speed_vs_reference"] == pytest.approx(0.25)
    assert len(calls) == 2   # one timing each: every compiled variant is one graph
    md = bench_gpu.summarize({"env": {}, "parts": {"sac": {"time": rows}}})
    assert "| × autograd+compile |" in md and "not timed" not in md


@pytest.mark.parametrize("b,h,n,d,p,keep_rate", [(3, 2, 2, 4, 1, 0.5), (2, 3, 15, 8, 1, 0.5),
                                                 (4, 2, 31, 16, 5, 0.3), (2, 2, 9, 4, 1, 1.0),
                                                 (2, 2, 9, 4, 1, 0.01), (2, 3, 197, 8, 1, 0.5)])
def test_peer_cls_row_drop_is_the_reference_drop(b, h, n, d, p, keep_rate):
    """The plain-PyTorch peer's drop (its sort-free ordering of the kept rows) computes the
    library's reference drop with a fused token: same rows in the same order, same fused row;
    and so does its ``torch.compile`` (the form the GPU benchmark times)."""
    from benchmarks.peer_bsr import cls_row_drop
    from bsr_kernels.ops import reference
    from bsr_kernels.ops.common import num_kept

    gen = torch.Generator().manual_seed(b * 1000 + n)
    x, q, k = (torch.randn(*s, generator=gen, dtype=torch.float64)
               for s in ((b, n, h * d), (b, h, n, d), (b, h, n, d)))
    want = reference.drop_tokens(x, q, k, d ** -0.5, p, num_kept(keep_rate, n - p), True)[0]
    torch.testing.assert_close(cls_row_drop(x, q, k, keep_rate, p), want.float().double(),
                               rtol=1e-6, atol=1e-6)
    compiled = torch.compile(cls_row_drop, dynamic=False)
    torch.testing.assert_close(compiled(x, q, k, keep_rate, p), want.float().double(),
                               rtol=1e-5, atol=1e-5)


def test_hung_in_ptxas_reads_the_main_thread_only():
    """A compile hang whose main thread waits for ptxas (Triton's ``make_cubin``) is not retried
    in-process; a pool hang, where a worker thread is in ``make_cubin`` and the main thread
    waits for the pool, still is."""
    from benchmarks.bench_gpu import hung_in_ptxas

    def dump(main, other):
        return ("Timeout (180.0 s) while running 'compile(x)'\n\n"
                "Thread 0x7f1 (worker) (most recent call first):\n" + other +
                "\n\nThread 0x7f2 (MainThread) (most recent call first):\n" + main + "\n")
    cubin = ('  File ".../triton/backends/nvidia/compiler.py", line 494 in make_cubin\n'
             '  File ".../triton/compiler/compiler.py", line 324 in compile')
    wait = '  File "/usr/lib/python3.12/concurrent/futures/_base.py", line 451 in result'
    assert hung_in_ptxas(dump(main=cubin, other=wait))
    assert not hung_in_ptxas(dump(main=wait, other=cubin))
    assert not hung_in_ptxas("")
    # a pool worker's ptxas, found among the descendant processes
    kids = "\n\nChild processes (pid: command line):\n  {}\n"
    assert hung_in_ptxas(dump(main=wait, other=wait) + kids.format(
        "812: /opt/triton/backends/nvidia/bin/ptxas -lineinfo -v --gpu-name sm_90a /tmp/x.ptx"))
    assert not hung_in_ptxas(dump(main=wait, other=wait) + kids.format(
        "811: /usr/bin/python3 -m torch._inductor.compile_worker --workers=16"))


def test_dump_stacks_lists_child_processes(tmp_path):
    """The watchdog's dump names the process's descendants with their command lines (where a
    hang in a compiler subprocess shows)."""
    import pathlib

    from benchmarks.bench_gpu import CHILDREN_HEADER, dump_stacks

    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc on this system: descendants cannot be listed")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        # Popen returns after the fork: until the exec is done, /proc shows no command line
        # (CI once listed the child as "  <pid>: ").
        deadline = time.monotonic() + 30
        cmdline = pathlib.Path(f"/proc/{child.pid}/cmdline")
        while b"time.sleep(30)" not in cmdline.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        path = tmp_path / "stacks.txt"
        with open(path, "w") as f:
            dump_stacks(f.fileno(), "header")
        text = path.read_text()
    finally:
        child.kill()
        child.wait()
    assert text.startswith("header") and f"{CHILDREN_HEADER}:" in text
    assert f"  {child.pid}: {sys.executable} -c import time; time.sleep(30)" in text, text


def test_keep_hang_sources_copies_the_module_and_the_ptx(tmp_path):
    """A hung compilation's inductor module (named in the stacks) and the PTX its ``ptxas``
    child reads are copied beside the stacks file; other children's arguments and files that
    are gone are left out."""
    from benchmarks.bench_gpu import keep_hang_sources

    src = tmp_path / "src"
    src.mkdir()
    ptx, other = src / "tmpa1.ptx", src / "tmpb2.ptx"
    ptx.write_text(".version 8.7 // kernel")
    other.write_text("not read by ptxas")
    module = tempfile.NamedTemporaryFile("w", suffix=".py", prefix="torchinductor_t",
                                         dir="/tmp", delete=False)
    module.write("# inductor output")
    module.close()
    try:
        stacks = (f'Thread 0x1 (MainThread):\n  File "{module.name}", line 274 in <module>\n'
                  '  File "/tmp/torchinductor_gone/xy.py", line 1 in <module>\n')
        children = [(7, f"/opt/triton/bin/ptxas -v --gpu-name=sm_90a {ptx} -o {ptx}.o"),
                    (8, f"/usr/bin/python3 worker {other}")]
        kept = keep_hang_sources(str(tmp_path / "stacks-op-x.txt"), stacks, children)
    finally:
        os.remove(module.name)
    names = sorted(os.path.basename(k) for k in kept)
    assert names == ["stacks-op-x.module0.py", "stacks-op-x.ptx0.ptx"], names
    assert (tmp_path / "stacks-op-x.module0.py").read_text() == "# inductor output"
    assert (tmp_path / "stacks-op-x.ptx0.ptx").read_text() == ".version 8.7 // kernel"


def test_sync_part_checks_each_mode_and_names_them(tmp_path, monkeypatch):
    """The sync part on CPU runs each memory mode's step (nothing to check: None) and leaves the
    compiled check to CUDA; the summary names every check, the compiled one apart."""
    bench_gpu = _import_bench("bench_gpu")
    w = bench_gpu.Worker("sync", str(tmp_path), [], 30.0, time.time() + 300)
    monkeypatch.setattr(bench_gpu, "WORKER", w)
    out = bench_gpu.part_sync(False, "cpu")
    assert out == {"autograd sync-free": None, "fast sync-free": None, "lean sync-free": None}
    assert {"autograd+compile", "lean+compile"} <= set(bench_gpu.SYNC_CHECKS)
    md = bench_gpu.summarize({"env": {}, "parts": {"sync": {
        "autograd sync-free": True, "autograd compiled sync-free": "RuntimeError: synchronizing",
        "lean sync-free": "skipped: hung in an earlier attempt (x)"}}})
    assert ("autograd yes, autograd compiled NO: RuntimeError: synchronizing, lean not checked "
            "(skipped: hung in an earlier attempt (x))") in md, md


def test_summary_has_the_launch_sweep():
    """``results.md`` shows the sweep's launch-table row and its fastest launch per shape."""
    from benchmarks.bench_gpu import summarize

    def row(ms, pps, w, sw, **radix):
        return [ms, {"programs_per_sm": pps, "num_warps": w, "select_warps": sw, **radix}]
    sweep = {"ViT-B B=128": {"best": row(0.0662, 8, 4, 4), "default": [row(0.0822, 4, 4, 1)],
                             "all": []},
             "ViT-B B=8": {"best": row(0.0201, 8, 4, 4, select_radix_bits=4),
                           "default": [row(0.0277, 8, 4, 4, select_radix_bits=1)], "all": []},
             "stop": "at the deadline"}
    md = summarize({"env": {"device": "GPU"}, "parts": {"sweep": sweep}})
    # a sweep from before the digit width was swept, and one after
    assert ("| ViT-B B=128 | 82.2 (4 per SM, 4 warps, selection 1) | 66.2 (8 per SM, 4 warps, "
            "selection 4) |") in md
    assert ("| ViT-B B=8 | 27.7 (8 per SM, 4 warps, selection 4, 1-bit digits) | 20.1 (8 per "
            "SM, 4 warps, selection 4, 4-bit digits) |") in md


def test_fwd_bwd_ratio_from_graph_replays_where_both_were_captured():
    """The op's fwd+bwd speedup over a peer comes from CUDA-graph replays when both were
    captured (as the forward's), else from the eager calls, and says which; the eager ratio is
    kept beside it. The summary marks a ratio from eager calls."""
    from benchmarks.bench_gpu import _forward_ratio, fwd_bwd_figures

    res = {"fwd+bwd": {"ours": {"ms": 1.0}, "a": {"ms": 1.5}, "b": {"ms": 1.6}},
           "fwd+bwd_graph": {"ours": {"ms": 0.1}, "a": {"ms": 0.4}, "b": {"error": "capture"}}}
    fwd_bwd_figures(res, "ours", ["a", "b"])
    assert res["fwd+bwd speedup vs a"] == pytest.approx(4.0)
    assert res["fwd+bwd speedup vs a (eager calls)"] == pytest.approx(1.5)
    assert res["fwd+bwd speedup vs b"] == pytest.approx(1.6)
    assert res["fwd+bwd_ratio_from"] == {"a": "fwd+bwd_graph", "b": "fwd+bwd"}
    assert _forward_ratio(res, "a", "fwd+bwd") == "4.00×"
    assert _forward_ratio(res, "b", "fwd+bwd") == "1.60× (eager calls)"
    # a result of a run before graph replays were taken: its ratio was from eager calls
    assert _forward_ratio({"fwd+bwd speedup vs a": 1.62}, "a", "fwd+bwd") == "1.62× (eager calls)"


def test_bench_gpu_tests_part(tmp_path):
    """The ``tests`` part runs the suite's CUDA cases under pytest (here, ``--smoke``, a CPU
    selection of the same files) and records the counts; results.md says them. Its parser
    reads pytest's last line, the failures and the skip reasons."""
    from benchmarks.bench_gpu import tests_result

    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_gpu", "--smoke", "--out",
                           str(tmp_path), "--parts", "tests"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        part = json.load(f)["parts"]["tests"]
    assert part["returncode"] == 0 and part["counts"]["passed"] == 2, part
    assert "-k 'known_backends or assert_kept_matches'" in part["command"]
    assert "tests (`pytest -v" in (tmp_path / "results.md").read_text()
    run = ("tests/test_ops.py::test_a[cuda] FAILED [ 20%]\n"
           "tests/test_ops.py::test_b[cuda] PASSED [ 40%]\n"
           "tests/test_ops.py::test_c[cuda] SKIPPED (needs two CUDA devices) [ 60%]\n")
    text = (run + "FAILED tests/test_ops.py::test_a[cuda] - AssertionError: x\n"
            "SKIPPED [2] tests/test_modes.py:181: needs two CUDA devices\n"
            "= 1 failed, 3 passed, 2 skipped, 5 deselected, 1 warning in 2.00s =\n")
    res = tests_result(text, 1, "pytest")
    assert res["counts"] == {"failed": 1, "passed": 3, "skipped": 2, "deselected": 5}
    assert res["failed"] == ["FAILED tests/test_ops.py::test_a[cuda] - AssertionError: x"]
    assert res["skipped"] == ["SKIPPED [2] tests/test_modes.py:181: needs two CUDA devices"]
    # stopped before its summary: the outcomes -v printed so far
    assert tests_result(run, None, "pytest")["counts"] == {"failed": 1, "passed": 1,
                                                           "skipped": 1}
    # every selected test skipped is a result, not "no summary"
    assert tests_result("= 3 skipped, 700 deselected in 1.0s =", 0, "pytest")["counts"] == {
        "skipped": 3, "deselected": 700}


def test_bench_gpu_tests_part_stops_at_its_time(tmp_path, monkeypatch):
    """A tests part with too little time left is not started, and one that outlives its time
    is stopped (its whole process group) and reported out of time: both are printed for a
    second call, not taken for a result."""
    from benchmarks import bench_gpu

    worker = SimpleNamespace(deadline=time.time() + 30, stop_at=time.time() + 30)
    monkeypatch.setattr(bench_gpu, "WORKER", worker)
    res = bench_gpu.part_tests(False, "cpu")
    assert res["error"].startswith("skipped: out of time") and "counts" not in res
    monkeypatch.setattr(bench_gpu, "MIN_TESTS_S", 1.0)
    slow = tmp_path / "test_slow.py"
    pid_file = tmp_path / "grandchild.pid"
    slow.write_text("import subprocess, sys, time\n\ndef test_fast():\n    pass\n\n"
                    "def test_slow():\n    p = subprocess.Popen([sys.executable, '-c', "
                    "'import time; time.sleep(120)'])\n"
                    f"    open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
                    "    time.sleep(120)\n")
    monkeypatch.setattr(bench_gpu, "CUDA_TESTS", (str(slow),))
    monkeypatch.setattr(bench_gpu, "SMOKE_TESTS_SELECT", "fast or slow")
    worker.deadline = worker.stop_at = time.time() + 16
    t0 = time.time()
    res = bench_gpu.part_tests(False, "cpu")
    assert time.time() - t0 < 25 and "out of time" in res["error"], res
    assert res["counts"] == {"passed": 1}, res  # what -v printed before the stop
    grandchild = int(pid_file.read_text())      # what the tests started went with them
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {grandchild}, started by the stopped tests, still runs")
    md = bench_gpu.summarize({"env": {"device": "cpu"}, "parts": {"tests": res}})
    assert "--parts tests" in md, md


def test_op_passes_run_each_kernel_of_the_op():
    """``bench_gpu``'s per-kernel timings call each Triton kernel of the op on its real
    arguments (here in Triton's interpreter): their outputs have the op's shapes, and the
    backward's are finite and not all zero."""
    from benchmarks._suite import make_inputs
    from benchmarks.bench_gpu import op_passes
    from bsr_kernels.ops import triton_backend as tb

    if tb.interpreter_problem():
        pytest.skip(tb.interpreter_problem())
    b, n, h, c = 2, 9, 2, 8
    x, q, k, _, _ = make_inputs(b, n, h, c, torch.float32)
    fns = op_passes(x, q, k, (c // h) ** -0.5)
    assert list(fns) == ["logits+select", "gather", "backward rows", "backward cls"]
    x_out = fns["gather"]()
    assert x_out.shape == (b, 1 + 4 + 1, c)
    grad_x, grad_scores = fns["backward rows"]()
    grad_q, grad_k = fns["backward cls"]()
    assert grad_x.shape == x.shape and grad_scores.shape == (b, n - 1)
    assert grad_q.shape == q.shape and grad_k.shape == k.shape
    assert torch.isfinite(grad_q).all() and grad_k.abs().sum() > 0


def _aten_counts(variant: str) -> dict:
    """How often each op is called in the forward and backward graphs that ``torch.compile``
    (through AOTAutograd) makes of one training step of ``variant`` on the suite's tiny ViT."""
    import collections

    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    from benchmarks import _suite as suite
    counts = {"fw": collections.Counter(), "bw": collections.Counter(),
              "graphs": collections.Counter()}

    def op(node) -> str:
        # torch 2.11 runs an op that draws random numbers (SDPA: its dropout) inside a
        # checkpointed region through run_and_save_rng_state(op, ...) in forward and
        # run_with_rng_state(state, op, ...) in backward: the op is what runs
        name = str(node.target)
        wrapped = {"run_and_save_rng_state": 0, "run_with_rng_state": 1}.get(name)
        return name if wrapped is None else str(node.args[wrapped])

    def counting(kind):
        def compiler(gm, example_inputs):
            counts["graphs"][kind] += 1
            counts[kind].update(op(n) for n in gm.graph.nodes if n.op == "call_function")
            return make_boxed_func(gm.forward)
        return compiler

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=counting("fw"),
                                     bw_compiler=counting("bw"))

    torch.manual_seed(0)
    model = suite.create_vit("tiny")
    module, _ = suite.build_variant(variant, model)
    torch._dynamo.reset()
    try:
        x = torch.randn(2, 3, *model.patch_embed.img_size)
        torch.compile(module, backend=backend, dynamic=False)(x).sum().backward()
    finally:
        torch._dynamo.reset()
    return counts


def test_compiled_autograd_step_is_the_compiled_peer_with_its_drop_swapped():
    """The library's GPU-fast path (autograd mode under torch.compile) does the plain-PyTorch
    peer's work and nothing more: the same matmuls, attention, LayerNorms and GELUs, forward and
    backward, one graph each; the peer's CLS-row drop composite is replaced by the drop op and
    its backward, and no other op (a cast, copy or clone) is called more often. An added copy in
    the block body, or a recompute, fails it."""
    peer, lib = _aten_counts("peer_bsr"), _aten_counts("bsr_autograd")
    assert peer["graphs"] == lib["graphs"] == {"fw": 1, "bw": 1}
    work = ("aten.addmm.default", "aten.mm.default", "aten.native_layer_norm.default",
            "aten.native_layer_norm_backward.default", "aten.gelu.default",
            "aten.gelu_backward.default",
            "aten._scaled_dot_product_flash_attention_for_cpu.default",
            "aten._scaled_dot_product_flash_attention_for_cpu_backward.default")
    assert peer["fw"]["aten.topk.default"] == 3 and peer["bw"]["aten.gelu_backward.default"] == 9
    for kind in ("fw", "bw"):
        for op in work:
            assert lib[kind][op] == peer[kind][op], (kind, op)
        assert peer[kind]["aten.addmm.default"] + peer[kind]["aten.mm.default"] > 0, kind
        # getitem: the drop op's tuple outputs
        more = {op: (n, peer[kind][op]) for op, n in lib[kind].items()
                if n > peer[kind][op] and op != "<built-in function getitem>"}
        drop = "bsr_kernels.drop_tokens.default" if kind == "fw" else \
            "bsr_kernels.drop_tokens_backward.default"
        assert more == {drop: (3, 0)}, (kind, more)


@pytest.mark.parametrize("mode,recomputed", [("fast", 0), ("lean", 21)])
def test_compiled_fast_and_lean_recompute_what_their_policy_says(mode, recomputed):
    """Compiled fast and lean (selective checkpointing): autograd mode's forward work, one graph
    each way, and a backward that does autograd mode's backward work plus the recomputes of
    their policy (bsr_kernels.backward), on the tiny ViT (blocks 3-11 run backward; 3, 7, 11
    trained): attention forward in all 9; fast no projection; lean qkv, proj and fc1 of the 6
    frozen blocks and proj of the 3 trained ones (21). The partitioner may also recompute the
    last block's fc2, whose output the final LayerNorm's backward needs, from tensors saved
    anyway (fast: 1 matmul with this torch), rather than save it: one more at most."""
    ref, got = _aten_counts("bsr_autograd"), _aten_counts(f"bsr_{mode}")
    assert got["graphs"] == {"fw": 1, "bw": 1}
    mm, sdpa = "aten.addmm.default", "aten._scaled_dot_product_flash_attention_for_cpu.default"
    for op in (mm, sdpa, "aten.native_layer_norm.default", "aten.gelu.default"):
        assert got["fw"][op] == ref["fw"][op] > 0, op
    assert got["fw"]["aten.mm.default"] == ref["fw"]["aten.mm.default"]
    for op in ("aten.mm.default", sdpa.replace(".default", "_backward.default"),
               "aten.native_layer_norm_backward.default", "aten.gelu_backward.default"):
        assert got["bw"][op] == ref["bw"][op] > 0, op
    assert ref["bw"][mm] == ref["bw"][sdpa] == 0
    assert got["bw"][sdpa] == 9
    assert recomputed <= got["bw"][mm] <= recomputed + 1


def _drop_rows(pass_, samples_ms, size="ViT-B", n=197, b=32):
    """Rows of bench_drop_compare's op scope for one pass and shape: candidate -> samples (ms per
    round), with the median the section records beside them."""
    return [dict(scope="op", size=size, N=n, B=b, pass_=pass_, candidate=name,
                 median_ms=statistics.median(s), samples_ms=list(s))
            for name, s in samples_ms.items()]


def test_drop_cpu_target_is_the_median_of_per_round_ratios():
    """The CPU target (C++ drop fwd+bwd against torch.compile(reference)) is the median of
    per-round ratios of samples taken in the same rounds, as every ratio of the suite
    (``_timing.paired_ratio``), not the ratio of the two medians: here a slow phase hit the
    rounds unevenly, and the two differ by 10x. Rows keep their samples for it."""
    dc = _import_bench("bench_drop_compare")
    from benchmarks._suite import SuiteConfig
    from benchmarks._timing import Timing, paired_ratio
    comp, ours = [1.0, 10.0, 10.0, 2.0, 30.0], [1.0, 1.0, 10.0, 2.0, 30.0]
    rows = (_drop_rows("fwd+bwd", {"bsr cpp": ours, "torch.compile(reference)": comp,
                                   dc.FLOOR: [0.5] * 5})
            + _drop_rows("fwd+bwd leaves", {"bsr cpp": [2.0] * 5,
                                            "torch.compile(reference)": [4.0] * 5}))
    per_round = statistics.median(c / o for c, o in zip(comp, ours))
    assert per_round == 1.0 and statistics.median(comp) / statistics.median(ours) == 5.0
    (target,) = dc.cpu_targets(SuiteConfig(device="cpu"), rows)
    assert target["value"] == pytest.approx(per_round) and target["verdict"] == "FAIL"
    assert "with q, k as leaves (no UnbindBackward stack): 2.00x" in target["where"]
    floor = paired_ratio(comp, [0.5] * 5)
    assert f"the {dc.FLOOR} of this pass: {floor:.2f}x" in target["where"]
    # the rows record each round's sample, in round order, beside their median
    row = dc._row(Timing("bsr cpp", [0.003, 0.001, 0.002], 4),
                  Timing("eager composite", [0.006, 0.001, 0.006], 1), scope="op", B=32)
    assert row["samples_ms"] == pytest.approx([3.0, 1.0, 2.0]) and row["median_ms"] == 2.0
    assert row["paired_speedup_vs_eager"] == pytest.approx(2.0)  # median of 2, 1, 3
    assert row["speedup_vs_eager"] == pytest.approx(3.0)  # ratio of medians, information
    assert (row["scope"], row["B"], row["candidate"], row["reps"], row["number"]) == (
        "op", 32, "bsr cpp", 3, 4)


def test_drop_cpu_target_reads_not_measured_without_compile_and_gpu_targets_name_the_gpu(
        monkeypatch):
    """--no-compile dropped the CPU drop target from the run (no line at all); it reads NOT
    MEASURED now, saying why. The GPU targets said "H100" whatever GPU measured them; a measured
    value names the device. The compiled peer is compiled for static shapes (dynamic=True made
    its forward 7-15 % slower: not the strongest peer)."""
    dc = _import_bench("bench_drop_compare")
    from benchmarks._suite import SuiteConfig
    (target,) = dc.cpu_targets(SuiteConfig(device="cpu", compile=False), [])
    assert target["value"] is None and target["verdict"] == "NOT MEASURED"
    assert "needs torch.compile" in target["where"]
    cfg = SuiteConfig(device="cpu")
    monkeypatch.setattr(type(cfg), "cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(dc, "_default_backend_name", lambda cfg: "bsr triton")
    row = dict(scope="op", pass_="forward", size="ViT-B", N=197, B=128,
               candidate="bsr triton", paired_speedup_vs_eager=6.0, bound_fraction=0.6)
    speed, fraction = dc._gpu_targets(cfg, [row])
    assert speed["verdict"] == "PASS" and speed["where"].endswith("forward, NVIDIA H200")
    assert fraction["value"] == 0.6 and "H100" not in fraction["where"]
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.update(kw) or fn)
    monkeypatch.setattr(dc, "_COMPILED", {})
    dc._compiled_reference(SuiteConfig(device="cpu"))
    assert seen["dynamic"] is False


def test_drop_cpu_target_reads_its_own_batch_and_no_tiny_run():
    """The CPU drop target reads the fwd+bwd rows of ViT-B N=197 B=32 only (rows of another
    batch of the same pass do not stand in for them); a --tiny run has no CPU drop target."""
    dc = _import_bench("bench_drop_compare")
    from benchmarks._suite import SuiteConfig
    ref = "torch.compile(reference)"
    rows = (_drop_rows("fwd+bwd", {"bsr cpp": [1.0] * 3, ref: [3.0] * 3})
            + _drop_rows("fwd+bwd", {"bsr cpp": [1.0] * 3, ref: [1.5] * 3}, b=64))
    (target,) = dc.cpu_targets(SuiteConfig(device="cpu"), rows)
    assert target["value"] == 3.0 and target["verdict"] == "PASS"
    assert dc.cpu_targets(SuiteConfig(device="cpu", tiny=True), rows) == []


def test_drop_gpu_targets_read_the_b128_forward_row_against_their_bounds(monkeypatch):
    """The drop op's GPU verdicts read our op's forward row of ViT-B N=197 B=128, not another
    batch's or candidate's: its paired speedup over the eager composite against >= 5x, its
    fraction of the bandwidth bound against >= ``FRACTION_TARGET`` (0.5); both pass on their
    bounds."""
    dc = _import_bench("bench_drop_compare")
    from benchmarks._suite import SuiteConfig
    cfg = SuiteConfig(device="cpu")
    monkeypatch.setattr(type(cfg), "cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(dc, "_default_backend_name", lambda cfg: "bsr triton")

    def row(b, speedup, fraction):
        return dict(scope="op", pass_="forward", size="ViT-B", N=197, B=b,
                    candidate="bsr triton", paired_speedup_vs_eager=speedup,
                    speedup_vs_eager=speedup, bound_fraction=fraction)

    composite = dict(row(128, 1.0, 0.1), candidate="eager composite")
    speed, fraction = dc._gpu_targets(cfg, [composite, row(32, 6.0, 0.7), row(128, 4.9, 0.45)])
    assert (speed["value"], speed["verdict"]) == (4.9, "FAIL")
    assert (fraction["value"], fraction["verdict"]) == (0.45, "FAIL")
    speed, fraction = dc._gpu_targets(cfg, [row(128, 5.0, 0.5)])
    assert speed["verdict"] == fraction["verdict"] == "PASS"


def test_drop_timings_rotate_inputs_beyond_the_cache():
    """The drop section's timings rotate each candidate's inputs over enough sets that the
    others' exceed the cache (on CUDA, the GPU's L2, so that it does not hold them): successive
    calls of a candidate see other buffers, in every pass; with no cache to defeat (the CPU
    default) there is one set."""
    dc = _import_bench("bench_drop_compare")
    from benchmarks._suite import SuiteConfig, make_inputs
    from benchmarks._timing import rotation_count
    for set_bytes, cache in [(10, 50), (10, 49), (10, 51), (100, 50), (7, 0), (3, 10 ** 6)]:
        n = rotation_count(set_bytes, cache)
        assert n >= 2 and (n == 32 or (n - 1) * set_bytes >= cache)
        assert n == 2 or (n - 2) * set_bytes < cache
    cfg = SuiteConfig(device="cpu", tiny=True)
    b, n, h, c = 2, 17, 2, 16
    set_bytes = (b * n * c + b * n * 3 * c) * 4  # x and the qkv tensor that q, k, v view

    def make(grad):
        return make_inputs(b, n, h, c, torch.float32, "cpu", grad)

    for grad in dc.PASSES.values():
        seen = {"a": [], "b": []}

        def cand(name):
            def fn(x, q, k, v):
                seen[name].append((x.data_ptr(), q.data_ptr(), k.data_ptr()))
                return x * 2 + (q.sum() + k.sum())
            return fn

        for cache, sets in [(2 * set_bytes, 3), (None, 1)]:
            for calls in seen.values():
                calls.clear()
            errors = {}
            timings = dc._time({name: cand(name) for name in seen}, make, grad, cfg, reps=2,
                               min_sample=1e-4, errors=errors, cache_bytes=cache)
            assert not errors and set(timings) == {"a", "b"}
            for name, calls in seen.items():
                assert len(set(calls)) == sets, (grad, cache, name)
                if sets > 1:   # a call never reads the buffers its predecessor read
                    assert all(p != q for p, q in zip(calls, calls[1:])), (grad, name)
            assert set(seen["a"]) == set(seen["b"])   # the candidates share the sets


def test_bench_gpu_graph_replays_are_interleaved_and_ratios_paired(monkeypatch):
    """bench_gpu's CUDA-graph times: every candidate captured first, then the replays timed
    interleaved over rounds (A B A B ...), per call; the op's ratios are the medians of per-round
    ratios (``_timing.paired_ratio``), not ratios of medians. The captures and ``do_bench`` are
    stand-ins (no GPU here): ``do_bench`` replays once and returns a scripted time per round."""
    import triton.testing
    bench_gpu = _import_bench("bench_gpu")
    ours, peer, broken = "bsr triton", bench_gpu.ROW_PEER, bench_gpu.EAGER_PEER
    script = {ours: [1.0, 1.0, 4.0], peer: [1.0, 4.0, 4.0]}   # ms per replay, per round
    order, captured = [], []

    class Graph:
        def __init__(self, name):
            self.name = name

        def replay(self):
            order.append(self.name)

    def capture(fn, n_calls):
        captured.append((fn.name, n_calls))
        if fn.name == broken:
            raise RuntimeError("capture failed")
        return Graph(fn.name)

    def do_bench(fn, **kw):
        fn()
        return script[order[-1]][order.count(order[-1]) - 1]

    def named(name):
        fn = (lambda: None)
        fn.name = name
        return fn

    monkeypatch.setattr(bench_gpu, "capture_graph", capture)
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(bench_gpu, "log", lambda *a: None)
    times = bench_gpu.graph_times({ours: named(ours), peer: named(peer),
                                   broken: named(broken)}, n_calls=2, rounds=3)
    assert captured == [(ours, 2), (peer, 2), (broken, 2)]   # each captured once, first
    assert order == [ours, peer] * 3
    assert list(times) == [ours, peer, broken] and "capture failed" in times[broken]["error"]
    assert times[ours]["samples"] == [0.5, 0.5, 2.0] and times[ours]["ms"] == 0.5   # per call
    assert times[peer]["ms"] == 2.0
    res = {"min_bytes": 1e6, "forward": {}, "forward_graph": times,
           "fwd+bwd_graph": times, "fwd+bwd": {}}
    bench_gpu.forward_figures(res, ours, [peer], copy_gbps=1.0)
    bench_gpu.fwd_bwd_figures(res, ours, [peer])
    per_round = statistics.median(p / o for p, o in zip(script[peer], script[ours]))
    assert per_round == 1.0 != times[peer]["ms"] / times[ours]["ms"]
    assert res[f"forward speedup vs {peer}"] == per_round
    assert res[f"fwd+bwd speedup vs {peer}"] == per_round
    # eager calls (do_bench_rounds, CPU here) keep their samples too, for the same ratio
    eager = bench_gpu.bench({"a": lambda: None, "b": lambda: None}, False, rounds=4)
    assert [len(eager[k]["samples"]) for k in "ab"] == [4, 4]
    assert eager["a"]["ms"] == statistics.median(eager["a"]["samples"])


def test_interleaved_samples_are_per_call_and_capped_at_max_number(monkeypatch):
    """``_timing.interleaved``: after warmup each candidate gets the number of back-to-back calls
    that makes a sample last ``min_sample_s``, at most ``max_number``; a sample is seconds per
    call; the rounds alternate A B A B. A fake clock advances 1 or 4 ticks per call (binary
    fractions of a second: the arithmetic is exact)."""
    timing = _import_bench("_timing")
    tick, clock, calls = 1 / 1024, [0.0], []

    def candidate(name, ticks):
        def fn():
            calls.append(name)
            clock[0] += ticks * tick
        return fn

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    got = timing.interleaved({"a": candidate("a", 1), "b": candidate("b", 4)}, reps=3, warmup=1,
                             min_sample_s=10 * tick, max_number=5, device_sync=False)
    assert (got["a"].number, got["b"].number) == (5, 3)  # a: 10 + 1 capped at 5; b: 10 // 4 + 1
    assert calls == ["a", "b"] + (["a"] * 5 + ["b"] * 3) * 3
    assert got["a"].samples == [tick] * 3 and got["b"].samples == [4 * tick] * 3
    assert got["b"].paired_ratio(got["a"]) == 4.0


def test_do_bench_rounds_reports_the_median_and_spread_over_rounds(monkeypatch):
    """``_timing.do_bench_rounds`` on CPU: per round the mean ms of 3 calls after one; ``ms`` the
    median over rounds, ``spread`` (max - min) / median, ``samples`` in round order; a
    candidate that raises is reported and the others go on."""
    timing = _import_bench("_timing")
    clock, durations = [0.0], iter([0.001] * 4 + [0.004] * 4 + [0.002] * 4)

    def step():
        clock[0] += next(durations)

    def broken():
        raise RuntimeError("no kernel")

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    got = timing.do_bench_rounds({"a": step, "b": broken}, cuda=False, rounds=3,
                                 log=lambda *a: None)
    assert got["a"]["samples"] == pytest.approx([1.0, 4.0, 2.0])
    assert got["a"]["ms"] == pytest.approx(2.0) and got["a"]["spread"] == pytest.approx(1.5)
    assert got["b"] == {"error": "RuntimeError: no kernel"}


def test_bench_gpu_speedup_is_the_peers_time_over_ours_per_round():
    """``bench_gpu.speedup(times, peer, ours)``: the median of per-round ratios peer / ours
    (above 1: ours is faster) when both kept their samples, else the ratio of the medians."""
    bench_gpu = _import_bench("bench_gpu")
    times = {"peer": {"ms": 6.0, "samples": [4.0, 10.0, 6.0]},
             "ours": {"ms": 2.0, "samples": [2.0, 2.0, 3.0]}}
    assert bench_gpu.speedup(times, "peer", "ours") == statistics.median([2.0, 5.0, 2.0])
    assert bench_gpu.speedup(times, "ours", "peer") == statistics.median([0.5, 0.2, 0.5])
    del times["ours"]["samples"]
    assert bench_gpu.speedup(times, "peer", "ours") == 6.0 / 2.0


def test_bench_gpu_launch_sweep_times_the_settings_interleaved(monkeypatch):
    """The launch sweep timed each setting alone, one after the other (graph_ms), so its
    "best" compared medians taken minutes apart. Every setting's calls are now captured under
    that setting and all replays go through graph_times (interleaved by round); a setting whose
    capture fails is reported and sorted last. CPU stand-ins for the GPU calls."""
    bench_gpu = _import_bench("bench_gpu")
    from bsr_kernels.ops import triton_backend as tb
    seen, launches = {}, []
    monkeypatch.setattr(bench_gpu, "l2_bytes", lambda *a: 0)
    monkeypatch.setattr(bench_gpu, "OP_SHAPES", [("tiny", 2, 2, 9, 4)])
    monkeypatch.setattr(bench_gpu, "WORKER", type("W", (), {"put": lambda *a: None})())
    monkeypatch.setattr(bench_gpu, "log", lambda *a: None)
    monkeypatch.setattr(bench_gpu.bsr_kernels, "drop_tokens",
                        lambda *a: launches.append(dict(tb.LAUNCH)))

    def graph_times(cands, n_calls, rounds=3):
        seen.update(cands)
        out = {}
        for i, fn in cands.items():
            fn()    # what a capture records: the call under its setting
            out[i] = {"error": "capture failed"} if i == 1 else {"ms": 1.0 + (i % 5)}
        return out

    monkeypatch.setattr(bench_gpu, "graph_times", graph_times)
    out = bench_gpu.part_sweep(True, "cpu")["tiny"]
    grid = [r[1] for r in out["all"]]
    assert len(seen) == len(grid) and len(launches) == len(grid)
    keys = ("programs_per_sm", "num_warps", "select_warps", "select_radix_bits")
    assert {tuple(l[k] for k in keys) for l in launches} == {
        tuple(g[k] for k in keys) for g in grid}   # each call ran under its own setting
    assert out["best"][0] == 1.0 and out["all"][-1][0] == float("inf")
    assert out["all"][-1][1]["error"] == "capture failed"


def test_bench_gpu_merge_refuses_other_software_and_states_what_differs_per_call():
    """``--merge`` refuses calls on another device or with another torch, triton or CUDA (their
    ratios do not compare), naming the entry; what may differ between calls (compile threads,
    the compile pool probe) is stated per call, not taken from the first call for all; each
    part's seconds come from the call it was taken from."""
    bench_gpu = _import_bench("bench_gpu")
    sw = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0",
          "cuda": "13.0"}
    probe = {"seconds": 13.2, "pool_ready_s": 10.4, "part": "op-compiled",
             "threads": "inductor's default"}
    first = {"env": {**sw, "compile_threads": "1", "compile_pool_probe": probe,
                     "part_seconds": {"check": 49.0, "step": 20.0}},
             "parts": {"check": {"cases": [1], "failures": 0}, "step": {"rows": []}}}
    second = {"env": {**sw, "compile_threads": "inductor's default",
                      "part_seconds": {"step": 35.0}}, "parts": {"step": {"rows": []}}}
    merged = bench_gpu.merge_results([first, second])
    assert merged["env"] == {**sw, "part_seconds": {"check": 49.0, "step": 35.0}}
    md = bench_gpu.summarize(merged)
    assert "- call 1: compile_threads: 1\n" in md
    assert "- call 2: compile_threads: inductor's default\n" in md
    assert ("- call 1: compile pool probe (part op-compiled): a trivial compile ran in 13.2 s"
            in md)
    assert md.count("compile pool probe") == 1
    assert ("Merged from calls (the header's device and software in each): 1: check; "
            "2: step") in md
    for key, other in [("device", "NVIDIA H200"), ("torch", "2.12.0+cu130"),
                       ("triton", "3.7.0"), ("cuda", "12.8")]:
        with pytest.raises(ValueError, match=f"differs in '{key}'.*call 2: {re.escape(other)}"):
            bench_gpu.merge_results([first, {**second, "env": {**second["env"], key: other}}])
    without = {k: v for k, v in second["env"].items() if k != "triton"}
    with pytest.raises(ValueError, match="differs in 'triton'.*call 2: None"):
        bench_gpu.merge_results([first, {**second, "env": without}])


def test_fraction_cells_keep_a_failing_value_below_its_bound():
    """A fraction just under a >= bound never shows as the bound in a table (0.4999 as "50%"
    beside a FAIL): the op tables use ``Target.shown_value``'s rule (``_suite.shown_percent``),
    as many decimals as keep the value on its verdict's side; without a target, whole percents."""
    from benchmarks._suite import Target, shown_percent
    bench_gpu = _import_bench("bench_gpu")
    dc = _import_bench("bench_drop_compare")

    def pct(cell):
        return float(cell.rstrip("%")) / 100

    for value in (0.49, 0.4999, 0.4999257, 0.49999, 0.4999999, 0.5, 0.5001, 0.61):
        text = shown_percent(value, 0.5)
        assert Target("", pct(text), ">=", 0.5).passed == (value >= 0.5), (value, text)
        assert text == Target("", value, ">=", 0.5).shown_value(percent=True)
        below = shown_percent(value, 0.5, "<=")   # the rule holds for an upper bound too
        assert Target("", pct(below), "<=", 0.5).passed == (value <= 0.5), (value, below)
        shape = {"forward": {"bsr triton": {"ms": 0.06}}, "fraction_of_copy": value}
        op = {"copy_gbps": 3000.0, "ViT-B B=128": shape, "ViT-S B=256": shape}
        md = bench_gpu.summarize({"env": {}, "parts": {"op": op}})
        cells = {ln.split(" | ")[0][2:]: ln.split(" | ")[2] for ln in md.splitlines()
                 if ln.startswith("| ViT-")}
        assert cells["ViT-B B=128"] == text                # its target: >= 0.5
        assert cells["ViT-S B=256"] == f"{100 * value:.0f}%"  # no target on that shape
        table = dc.table({"rows": [dict(scope="op", size="ViT-B", N=197, B=128, pass_="forward",
                                        candidate="bsr triton", median_ms=0.06,
                                        paired_speedup_vs_eager=5.0, gbps=1.0,
                                        bound_fraction=value)]})
        assert table.splitlines()[-1].split("|")[-2].strip() == text, table
    assert shown_percent(0.4999257, 0.5) == "49.99%" and shown_percent(0.07) == "7%"


def test_readme_section_states_where_appended_sections_were_measured():
    """The README's Performance section names each section's origin (machine, date, command)
    when ``--append`` joined sections of other runs: its header names the newest run alone."""
    run = _import_bench("run")
    readme = _import_bench("readme_section")

    def res(sections, cmd, cpu, date):
        meta = dict(config=dict(device="cpu", quick=True, tiny=True), command=cmd, date=date,
                    section_seconds={s: 1.0 for s in sections},
                    machine=dict(cpu=cpu, cpu_count=2, torch_threads=2, torch="2.14",
                                 timm="1.0", git_commit="c1"))
        return {"meta": meta, **{s: {"error": "not run here"} for s in sections}}

    one = res(["drop_tokens", "train_step"], "python -m benchmarks.run --sections drop_tokens",
              "AMD EPYC", "2026-11-26")
    assert "measured apart" not in readme.performance_section(one)
    merged = run.merge_results(one, res(["train_step"], "python -m benchmarks.run --sections "
                                        "train_step --append", "Intel Xeon", "2026-11-27"),
                               ["train_step"])
    text = readme.performance_section(merged)
    assert ("drop_tokens: AMD EPYC, commit c1, 2026-11-26, `python -m benchmarks.run --sections "
            "drop_tokens`") in text
    assert ("train_step: Intel Xeon, commit c1, 2026-11-27, `python -m benchmarks.run "
            "--sections train_step --append`") in text
    # a record kept before origins had their command names none
    merged["meta"]["section_origins"]["drop_tokens"].pop("command")
    text = readme.performance_section(merged)
    assert "drop_tokens: AMD EPYC, commit c1, 2026-11-26;" in text and "None" not in text


def test_archived_bench_gpu_results_state_their_json_verdicts():
    """An archived bench_gpu report (``benchmarks/results/*-h100*.md``) states the verdicts that
    ``bench_gpu.targets`` takes from the results.json beside it: the reports are generated, and
    one that says "0.5" of a FAIL at 0.4999 is stale."""
    import glob
    bench_gpu = _import_bench("bench_gpu")
    checked = 0
    for path in sorted(glob.glob(os.path.join(BENCH, "results", "*.json"))):
        md_path = path[:-5] + ".md"
        with open(path) as f:
            results = json.load(f)
        if not (os.path.exists(md_path) and "parts" in results and "env" in results):
            continue
        with open(md_path) as f:
            md = f.read()
        for t in bench_gpu.targets(results):
            assert f"- {t.line()}" in md, (md_path, t.line())
        checked += 1
    assert checked >= 2


def test_sync_part_keeps_each_check_under_its_summary_name(tmp_path, monkeypatch):
    """What the sync part saved as it went (all a stop at its time limit leaves) reads in the
    summary as the finished part does, and a mode whose warm-up raises is reported while the
    other modes are still checked."""
    bench_gpu = _import_bench("bench_gpu")
    import bsr_kernels
    w = bench_gpu.Worker("sync", str(tmp_path), [], 30.0, time.time() + 300)
    monkeypatch.setattr(bench_gpu, "WORKER", w)
    reprogram = bsr_kernels.reprogram

    def boom(images):
        raise RuntimeError("no fast here")

    def failing_fast(model, memory_mode, **kw):
        model = reprogram(model, memory_mode=memory_mode, **kw)
        if memory_mode == "fast":
            model.forward = boom
        return model
    monkeypatch.setattr(bench_gpu.bsr_kernels, "reprogram", failing_fast)
    out = bench_gpu.part_sync(False, "cpu")
    assert out["autograd sync-free"] is None and out["lean sync-free"] is None
    assert "no fast here" in str(out["fast sync-free"])
    saved = dict(w.state["result"], error="stopped at its 180 s time limit while running 'x'")
    md = bench_gpu.summarize({"env": {}, "parts": {"sync": saved}})
    assert "autograd not checked (no CUDA)" in md and "lean not checked (no CUDA)" in md, md


def test_bench_gpu_help_names_every_part_with_a_time_limit():
    """``--help`` (the module docstring) names each part that stops at a time limit of its own
    (``PART_LIMITS_S``) where it says which parts do."""
    bench_gpu = _import_bench("bench_gpu")
    doc = " ".join(bench_gpu.__doc__.split())
    limited = re.search(r"A child stops itself at the deadline \((.*?)\),", doc).group(1)
    assert [p for p in bench_gpu.PART_LIMITS_S if f"``{p}``" not in limited] == [], limited


def test_bench_gpu_call_keeps_an_earlier_calls_results_in_its_out(tmp_path, monkeypatch):
    """A second call given the --out of the first (no part run: its deadline has passed) keeps
    the first call's results.json, which --merge needs, instead of writing over it."""
    bench_gpu = _import_bench("bench_gpu")
    monkeypatch.setattr(bench_gpu, "T0", bench_gpu.T0)  # main sets it: restored at the end
    for name in ("BSR_BENCH_T0", "TRITON_INTERPRET"):
        monkeypatch.setenv(name, "0")
    first = {"env": {"device": "cpu", "torch": "t", "triton": "3", "cuda": None},
             "parts": {"check": {"cases": [], "failures": 0}}}
    bench_gpu.write_results(str(tmp_path), first)
    assert bench_gpu.main(["--out", str(tmp_path), "--parts", "sync", "--smoke",
                           "--deadline-s", "0"]) == 0
    with open(tmp_path / "results.json") as f:
        assert list(json.load(f)["parts"]) == ["sync"]
    kept = [os.path.join(d, "results.json") for d, _, files in os.walk(tmp_path)
            if "results.json" in files and d != str(tmp_path)]
    assert len(kept) == 1, kept
    with open(kept[0]) as f:
        assert json.load(f) == first


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed and not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_bench_gpu_watchdog_kills_the_descendants_of_a_stopped_worker(tmp_path):
    """A worker that its watchdog or clock ends takes its descendants with it: a hung ptxas
    (one ran 180 s on the H100), compile workers or a pytest run must not go on running beside
    the timings of the parts after it."""
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc on this system: descendants cannot be listed")
    script = ("import subprocess, sys, time\n"
              "from benchmarks.bench_gpu import expiring\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
              "                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
              "print(child.pid, flush=True)\n"
              "with expiring(sys.argv[1], 1.0, 'Timeout', 7):\n"
              "    time.sleep(60)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "stacks.txt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 7, proc.stderr[-2000:]
    child = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _alive(child)
    if alive:
        os.kill(child, 9)
    assert not alive, "the stopped worker's child still runs"
    assert (tmp_path / "stacks.txt").read_text().startswith("Timeout")
