"""benchmarks/speed.py at the tiny shape on the CPU (every part, the FSDP mode under torchrun), the compiled-decode
set-up it relies on, the fused LoRA hook it measures, and the decoding layout and profile benchmarks beside it."""
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_qwen3

import flops
import shine

sys.path.insert(0, str(ROOT / "benchmarks"))
import speed  # noqa: E402

TINY = flops.Shape.from_config(speed.build_llm("tiny", torch.bfloat16, torch.device("cpu")).config)
FIELDS = {  # every measurement the lead's table and the README need
    "gen": ({"fp32_autocast_b1", "bf16_b1", "bf16_b8", "bf16_b8_meta_merged", "linears_only_b8"},
            {"ms", "peak_gib", "ms_per_context", "contexts_s", "tflops"}),
    "train": ({"no_ckpt", "varied_lengths", "ckpt"}, {"ms", "peak_gib", "tok_s", "tflops", "mfu"}),
}
DECODE = {"ms", "peak_gib", "tok_s", "prefill_ms", "ms_per_step", "decode_tok_s", "predicted_gib"}


def leaves(tree, path=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{path}/{key}")
        elif isinstance(value, list):  # e.g. the compiled modes' step time in every round
            yield from leaves(dict(enumerate(value)), f"{path}/{key}")
        else:
            yield f"{path}/{key}", value


def run(args, tmp_path, torchrun=False):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] \
        if torchrun else [sys.executable]
    done = subprocess.run(launcher + [str(ROOT / "benchmarks" / "speed.py"), "--shape", "tiny", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_tiny_run_reports_every_part_with_finite_positive_numbers(tmp_path):
    out = tmp_path / "speed.json"
    stdout = run(["--compile-backend", "eager", "--profile", "train", "--out", str(out)], tmp_path)
    r = json.loads(out.read_text())
    assert r["device"].startswith("cpu") and r["gpus"] == 1 and r["torch"] == torch.__version__
    for part, (configs, fields) in FIELDS.items():
        assert set(r[part]) == configs
        assert all(fields <= set(r[part][c]) for c in configs), part
    every = {"base", "hooks", "merged", "base_after"}
    compiled = {"b1": {"base", "hooks", "merged"}, "b16": {"base", "hooks"}}  # interleaved rounds: no base_after
    compiled = {b: modes | {m + speed.GUARDS_SKIPPED for m in modes} for b, modes in compiled.items()}
    for part, modes in (("decode", {"b1": every, "b16": every}), ("compile", compiled), ("loop", compiled)):
        assert {b: set(r[part][b]) for b in r[part]} == modes, part
        for b in modes:
            assert all(DECODE <= set(r[part][b][m]) for m in modes[b])
            assert all("x_base" in r[part][b][m] for m in modes[b] - {"base", "base" + speed.GUARDS_SKIPPED})
            assert r[part][b]["hooks"]["x_base"] == pytest.approx(
                r[part][b]["hooks"]["ms_per_step"] / r[part][b]["base"]["ms_per_step"])
    assert {"merge_ms", "merge_cpu_ms"} <= set(r["decode"]["b16"]["merged"])
    for part, (b, modes) in itertools.product(("compile", "loop"), compiled.items()):  # median round of three
        for m in modes:
            rounds = r[part][b][m]["ms_per_step_rounds"]
            assert len(rounds) == 3 and r[part][b][m]["ms_per_step"] == sorted(rounds)[1]
    values = dict(leaves(r))
    assert not [p for p in values if "/error" in p]  # "/error", "/errors/0", ...
    numbers = {p: v for p, v in values.items() if not isinstance(v, str)}
    assert [p for p, v in numbers.items() if not (math.isfinite(v) and v > 0)] == []
    # the counts behind the rates: flops.py's FLOPs, the issue's token counts (tiny lengths), App. B.6's memory
    gen = r["gen"]["bf16_b8"]
    assert gen["tflops"] * gen["ms"] * 1e9 == pytest.approx(8 * flops.shine_flops(TINY, 40)["total"])
    assert gen["contexts_s"] == pytest.approx(8e3 / gen["ms"])
    gemms, shapes = r["gen"]["linears_only_b8"], shine.lora_shapes(speed.build_llm("tiny", torch.bfloat16, "cpu"))
    tokens = 8 * (40 + shine.num_memory_tokens(8, shapes, 64))  # contexts + memory tokens
    assert gemms["tflops"] * gemms["ms"] * 1e9 == pytest.approx(2 * tokens * 2 * sum(i * o for i, o in shapes.values()))
    step = r["train"]["ckpt"]
    assert step["tok_s"] * step["ms"] / 1e3 == pytest.approx(31 + 40)
    forward = flops.shine_flops(TINY, 31)["total"] + flops.llm_flops(TINY, 40, logits=39, lora_rank=8)["total"]
    assert step["tflops"] * step["ms"] * 1e9 == pytest.approx(3 * forward)
    assert step["mfu"] == pytest.approx(step["tflops"] / 989)
    varied = r["train"]["varied_lengths"]  # 4 steps, contexts and answers 1/8 shorter each time; ms per step
    assert varied["tok_s"] * 4 * varied["ms"] / 1e3 == pytest.approx((31 + 28 + 24 + 20) + (40 + 35 + 30 + 25))
    hyper = flops.hypernetwork_params(TINY)["total"]
    kv = 2 * 2 * (12 + 16) * 2 * 16  # layers x (K, V) x (prompt + new tokens) x kv heads x head dim
    assert r["decode"]["b16"]["base"]["predicted_gib"] * flops.GiB == pytest.approx(
        2 * TINY.params() + 4 * hyper + 2 * 16 * kv)
    decode = r["decode"]["b1"]["hooks"]
    assert decode["tok_s"] == pytest.approx(16e3 / decode["ms"])
    assert decode["ms_per_step"] == pytest.approx((decode["ms"] - decode["prefill_ms"]) / 15)
    assert "aten::" in (tmp_path / "profile_train_ckpt.txt").read_text()
    table = stdout[stdout.index("TFLOP/s"):]
    assert all(row in table for row in ("gen/bf16_b8", "decode/b16/hooks", "train/no_ckpt", "compile/b16/hooks",
                                             "loop/b1/merged"))


@pytest.mark.slow
def test_fsdp_mode_under_torchrun_reports_per_gpu_rates_and_scaling(tmp_path):
    baseline = tmp_path / "one_gpu.json"
    baseline.write_text(json.dumps({"train": {"no_ckpt": {"tok_s": 7.0}, "ckpt": {"tok_s": 5.0}}}))
    out = tmp_path / "fsdp.json"
    run(["--fsdp", "--baseline", str(baseline), "--out", str(out)], tmp_path, torchrun=True)
    r = json.loads(out.read_text())
    assert r["gpus"] == 2 and set(r) >= {"train", "train_wall_s"} and "gen" not in r
    for name, one_gpu in (("no_ckpt", 7.0), ("ckpt", 5.0)):
        step = r["train"][name]
        assert step["scaling_efficiency"] == pytest.approx(step["tok_s"] / one_gpu)
        assert step["all_gpus_tok_s"] == pytest.approx(2 * step["tok_s"])
        assert step["tok_s"] * step["ms"] / 1e3 == pytest.approx(31 + 40)  # each rank's own batch
        assert all(math.isfinite(v) and v > 0 for v in step.values())


def test_fsdp_needs_torchrun_and_parts_are_checked():
    with pytest.raises(SystemExit):
        speed.parse_args(["--fsdp"])
    with pytest.raises(SystemExit):
        speed.parse_args(["--compile-layers"])  # gen and train only
    assert speed.parse_args(["--compile-layers", "--only", "train"]).compile_layers
    with pytest.raises(SystemExit):
        speed.parse_args(["--only", "gen,decoding"])
    assert speed.parse_args(["--only", "train,gen"]).only == ["gen", "train"]  # always in PARTS order


def test_compiled_decoding_with_kept_hooks_uses_each_adapter_without_recompiling():
    """Dynamo skips hook guards by default, so a decoding step compiled without the LoRA hooks would be reused
    once they are added, decoding without the adapter. Kept hooks (speed.py's compile set-up) are always there:
    the step reads each adapter, and a second adapter of the same shape compiles nothing new."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = tiny_qwen3()
    model.generation_config.pad_token_id = 0
    ids = torch.randint(0, 128, (1, 9))
    loras = [{l: {n: (torch.randn(1, i, 4), torch.randn(1, 4, o)) for n, (i, o) in shine.lora_shapes(model).items()}
              for l in range(2)} for _ in range(2)]
    greedy = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8)
    compiled = speed.compiled_generate_kwargs("eager", fullgraph=True)
    shine.keep_lora_hooks(model)
    with torch.no_grad():
        base = model.generate(ids, **greedy)
        assert torch.equal(model.generate(ids, **greedy, **compiled), base)  # compiles the base model's step
        for k, lora in enumerate(loras):
            with shine.lora_applied(model, lora):
                adapted = model.generate(ids, **greedy)
                assert torch.equal(model.generate(ids, **greedy, **compiled), adapted)
            assert not torch.equal(adapted, base)
            graphs = counters["stats"]["unique_graphs"] if k == 0 else graphs
        assert counters["stats"]["unique_graphs"] == graphs  # the second adapter: no new graph
        assert torch.equal(model.generate(ids, **greedy, **compiled), base)  # and the adapter is gone again
        with shine.lora_merged(model, loras[0]):  # merged in place: the base's compiled step sees the new weights
            assert torch.equal(model.generate(ids, **greedy, **compiled), model.generate(ids, **greedy))
            assert not torch.equal(model.generate(ids, **greedy, **compiled), base)
        assert torch.equal(model.generate(ids, **greedy, **compiled), base)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):  # as speed.py's *_guards_skipped:
            assert torch.equal(model.generate(ids, **greedy, **compiled), base)  # the guards left still tell the
            with shine.lora_applied(model, loras[1]):  # graphs with and without an adapter apart
                assert torch.equal(model.generate(ids, **greedy, **compiled), adapted)
            assert torch.equal(model.generate(ids, **greedy, **compiled), base)
    shine.drop_lora_hooks(model)
    assert not any(m._forward_hooks or hasattr(m, "shine_loras") for m in model.modules())
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- the fused hook (shine._add_lora)
@pytest.mark.parametrize("adapters, rows", [(0, 3), (1, 1), (3, 3), (2, 4)])  # 0: one 2-D LoRA for every row
def test_fused_hook_equals_output_plus_scaled_x_a_b(adapters, rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 5, bias=False)
    x = torch.randn(rows, 7, 6)
    A, B = (torch.randn(6, 3), torch.randn(3, 5)) if not adapters else (torch.randn(adapters, 6, 3),
                                                                         torch.randn(adapters, 3, 5))
    got = shine._add_lora(linear, (x,), linear(x), A, B, scale=0.5)
    per_row = lambda t: t if t.dim() == 2 else t.repeat_interleave(rows // adapters, 0)  # beams repeat each row
    reference = torch.stack([linear(x[i]) + 0.5 * x[i] @ per_row(A)[i if A.dim() == 3 else ...] @
                             per_row(B)[i if B.dim() == 3 else ...] for i in range(rows)])
    torch.testing.assert_close(got, reference)


def test_hooks_follow_the_dtype_the_linear_runs_in(qwen):
    """FSDP2 mixed precision: the weights are fp32 shards when lora_applied casts the LoRA, bf16 in forward."""
    ids = torch.randint(0, 128, (2, 6))
    shapes = shine.lora_shapes(qwen)
    lora = {l: {n: (torch.randn(2, i, 4) * 0.3, torch.randn(2, 4, o) * 0.3) for n, (i, o) in shapes.items()}
            for l in range(2)}
    with shine.lora_applied(qwen, lora):
        qwen.to(torch.bfloat16)  # as FSDP2 unshards bf16 weights only for the forward
        hooked = qwen(ids).logits
    with shine.lora_applied(qwen, lora):  # the LoRA cast to bf16 up front: the ordinary path
        reference = qwen(ids).logits
    torch.testing.assert_close(hooked, reference, atol=0, rtol=0)
    assert (reference - qwen(ids).logits).abs().max() > 0.1


def test_qwen3_8b_shape_is_the_papers_backbone():
    llm = speed.build_llm("qwen3-8b", torch.bfloat16, torch.device("meta"))  # shapes only, no memory
    assert flops.Shape.from_config(llm.config) == flops.PRESETS["qwen3-8b"]
    assert sum(p.numel() for p in llm.parameters()) == 8_190_735_360
    assert llm.dtype == torch.bfloat16 and llm.generation_config.eos_token_id is None  # N tokens every run


@pytest.mark.slow
def test_layout_and_profile_benchmarks_run_at_the_tiny_shape(tmp_path):
    """benchmarks/decode_lora_layout.py and profile_compiled_decode.py on the CPU (eager backend): every mode
    measured, the base is its own reference, one profiler table per mode naming dynamo's cache lookup."""
    import decode_lora_layout
    import profile_compiled_decode

    layout = decode_lora_layout.main(["--shape", "tiny", "--backend", "eager", "--out", str(tmp_path / "l.json")])
    torch._dynamo.reset()
    assert json.loads((tmp_path / "l.json").read_text()) == layout
    assert set(layout["results"]) == {"b1", "b16"}
    for row in layout["results"].values():
        assert set(row) == {"base", "generated", "decoding"} and row["base"]["x_base"] == 1.0
        assert all(math.isfinite(m["ms"]) and m["ms"] > 0 for m in row.values())
    report = profile_compiled_decode.main(["--shape", "tiny", "--backend", "eager", "--tokens", "4",
                                           "--out-dir", str(tmp_path)])
    torch._dynamo.reset()
    guards = speed.GUARDS_SKIPPED
    assert set(report) == {"base", "hooks", "base" + guards, "hooks" + guards}
    for mode, r in report.items():
        assert r["cache_lookup_ms_per_step"] > 0 and r["gpu_ms_per_step"] is None  # no GPU here
        assert "TorchDynamo Cache Lookup" in Path(r["table"]).read_text()
