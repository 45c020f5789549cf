"""Speed of SHINE at Qwen3-8B's shape (random bf16 weights, no download): adapter generation, decoding, training.

    python benchmarks/speed.py --shape qwen3-8b --out results/speed_h100.json          # one GPU, ~5-8 minutes
    python benchmarks/speed.py --shape qwen3-8b --only train --profile train --out results/speed_train.json
    torchrun --nproc_per_node=2 benchmarks/speed.py --shape qwen3-8b --fsdp --baseline results/speed_train.json \\
        --out results/speed_h100x2_fsdp.json                         # train.py's FSDP2 sharding (--fsdp-llm: LLM too)
    python benchmarks/speed.py --shape tiny --compile-backend eager --out /tmp/speed.json  # CPU smoke run (CI)

Issue 6; benchmarks/README.md defines every number. Medians of repeated runs after warm-up, timed by CUDA events
(perf_counter on the CPU); peak memory per measurement next to App. B.6's prediction (flops.peak_memory).
- gen: Shine.generate_lora on 1,150-token contexts (fp32 hypernetwork under bf16 autocast, bf16; batch 1 and 8;
  batch 8 also inside Shine.meta_lora_merged, the Meta-LoRA folded into weight copies for inference).
- decode: HF generate, 64 greedy tokens after a 200-token prompt, batch 1 and 16: base, merged, hooks.
- train: one step of the pretraining shape as train.py runs it (cuDNN attention off), without and with activation
  checkpointing; MFU counts 3 x flops.py's forward FLOPs (backward = 2x forward) against --peak-tflops.
- compile: decode with a static KV cache, its decoding step compiled by HF (CUDA graphs), batch 1 and 16: hooks
  (the adapter in shine.decoding_layout), base, and at batch 1 the adapter merged into the base's weights (the
  same compiled step, replayed); each again with dynamo's guards skipped (`*_guards_skipped`: how much of a step
  is the host checking guards); the modes alternate over three rounds, each reporting its median round. The LoRA
  hooks are kept attached (shine.keep_lora_hooks): dynamo skips hook guards by default, so a step compiled without
  them would silently be reused inside lora_applied, and kept hooks also spare a recompile per adapter.
- loop: as compile, each answer made by evaluate.greedy_decode instead of HF generate: the same static cache and
  CUDA-graph step (compiled like HF's), but the host waits for the GPU every 8 tokens instead of after each token,
  so that it queues the next step (dynamo's guard checks included) while the GPU runs this one.
- --compile-layers: gen and train with Shine.compile_layers (train.py's --compile).
"""
import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # shine.py, train.py, flops.py live at the root
import flops  # noqa: E402
import train  # noqa: E402
from evaluate import greedy_decode  # noqa: E402 - ours at the root, not Hugging Face's `evaluate`
from shine import (LLAMA_LINEARS, Shine, decoder_layers, decoding_layout, drop_lora_hooks,  # noqa: E402
                   keep_lora_hooks, lora_applied, lora_merged, merge_lora, target_linears, unmerge_lora)

CUDA = torch.cuda.is_available()
PARTS = ("gen", "decode", "train", "compile", "loop")  # in this order: the compiled ones are the slowest and riskiest
SHAPES = {  # backbone config (Qwen3-8B's public one, in shapes/), the lengths, (warm-up, timed) runs per part
    "qwen3-8b": dict(config=Path(__file__).resolve().parent / "shapes" / "qwen3-8b",
                     context=1150, train_context=1141, answer=1150, prompt=200, new_tokens=64,
                     runs=dict(gen=(3, 10), decode=(1, 3), train=(2, 5), compile=(1, 3))),
    "tiny": dict(config=dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
                 context=40, train_context=31, answer=40, prompt=12, new_tokens=16,
                 runs=dict(gen=(1, 2), decode=(1, 2), train=(1, 2), compile=(1, 2))),
}
GEN_BATCH, DECODE_BATCHES, VARIED_STEPS, COMPILE_ROUNDS = 8, (1, 16), 4, 3
T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {message}", flush=True)


def build_llm(shape: str, dtype: torch.dtype, device: torch.device):
    """A Qwen3 causal LM of `shape` built on `device` by HF's init: weights ~ N(0, 0.02), unit norms."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config

    config = SHAPES[shape]["config"]
    config = AutoConfig.from_pretrained(config) if isinstance(config, Path) else Qwen3Config(**config)
    with torch.device(device):
        llm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    llm.generation_config.pad_token_id = 0  # eos stays None: every run makes exactly N tokens
    return llm.eval()


def hypernetwork_to(shine: Shine, dtype: torch.dtype) -> None:
    for p in shine.hypernetwork_state_dict().values():
        p.data = p.data.to(dtype)


def autocast():
    return torch.autocast("cuda" if CUDA else "cpu", torch.bfloat16)


def measure(fn, warmup: int, runs: int) -> dict:
    """Median ms of `runs` calls after `warmup` calls, and the peak memory (GiB) meanwhile."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    peak = torch.cuda.max_memory_allocated() if CUDA else 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"ms": statistics.median(times), "peak_gib": peak / flops.GiB}


def predicted_gib(s: flops.Shape, tokens: int, batch: int = 1, kv_cache: bool = False, hyper_bytes: int = 4,
                  hyper_shards: int = 1, llm_shards: int = 1) -> float:
    """bf16 LLM weights and the hypernetwork (bytes a parameter), each split over its FSDP shards, + App. B.6's
    extra memory in bf16 (eq. 41 without KV cache: all layers' hidden states and MLP intermediates; eqs. 43-44
    with it)."""
    extra = flops.BF16 * batch * flops.peak_memory(s, "naive", tokens, 0, kv_cache)["total"]
    static = flops.BF16 * s.params() / llm_shards + hyper_bytes * flops.hypernetwork_params(s)["total"] / hyper_shards
    return (static + extra) / flops.GiB


def random_ids(batch: int, length: int, vocab: int, device) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), device=device)


def generated_lora(shine: Shine, batch: int, w: dict) -> dict:
    """One adapter per row from random contexts, as contiguous tensors in the LLM's dtype (what the hooks use)."""
    ids = random_ids(batch, w["context"], shine.llm.config.vocab_size, shine.memory.device)
    with torch.no_grad(), autocast():
        lora = shine.generate_lora(ids, torch.ones_like(ids))
    cast = lambda t: t.to(shine.llm.dtype).contiguous()
    return {l: {n: (cast(A), cast(B)) for n, (A, B) in m.items()} for l, m in lora.items()}


def profile(fn, path: Path, write: bool = True) -> None:
    """The top operators of three calls of `fn` by device time (CPU time without a GPU), as a text table (written
    by one process only: under torchrun every rank profiles, rank 0 writes)."""
    from torch.profiler import ProfilerActivity

    with torch.profiler.profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * CUDA) as prof:
        for _ in range(3):
            fn()
    if write:
        path.write_text(prof.key_averages().table(sort_by=f"self_{'cuda' if CUDA else 'cpu'}_time_total", row_limit=40))
        log(f"profile written to {path}")


# ----------------------------------------------------------------------------- the parts
def bench_gen(shine: Shine, s: flops.Shape, w: dict, args) -> dict:
    out, C = {}, w["context"]
    bf16, b8 = torch.bfloat16, GEN_BATCH
    for name, dtype, batch, merged in (("fp32_autocast_b1", torch.float32, 1, False), ("bf16_b1", bf16, 1, False),
                                       (f"bf16_b{b8}", bf16, b8, False), (f"bf16_b{b8}_meta_merged", bf16, b8, True)):
        log(f"gen {name}")
        hypernetwork_to(shine, dtype)
        ids = random_ids(batch, C, s.vocab, shine.memory.device)
        fn = lambda: shine.generate_lora(ids, torch.ones_like(ids))
        with torch.no_grad(), autocast() if dtype == torch.float32 else nullcontext(), \
                shine.meta_lora_merged() if merged else nullcontext():  # inference: the Meta-LoRA in weight copies
            r = measure(fn, *w["runs"]["gen"])
            if args.profile == "gen" and batch == GEN_BATCH:  # the rows measured against the 25 contexts/s
                profile(fn, args.out.parent / f"profile_gen_{name}.txt")
        out[name] = r | {"ms_per_context": r["ms"] / batch, "contexts_s": 1e3 * batch / r["ms"],
                         "tflops": batch * flops.shine_flops(s, C)["total"] / r["ms"] / 1e9,
                         "predicted_gib": predicted_gib(s, C + shine.num_memory, batch, False, dtype.itemsize)}
    hypernetwork_to(shine, torch.float32)
    log(f"gen: the backbone's linears alone at batch {GEN_BATCH}")
    out[f"linears_only_b{GEN_BATCH}"] = linears_only(shine.llm, GEN_BATCH * (C + shine.num_memory), w, GEN_BATCH)
    return out


@torch.no_grad()
def linears_only(llm, tokens: int, w: dict, batch: int) -> dict:
    """The target linears' GEMMs of every layer over `tokens` tokens, nothing else (no attention, norms, LoRA):
    what adapter generation's memory pass costs at the GEMMs' own speed, a floor for it without fewer FLOPs."""
    linears = [linear for layer in target_linears(llm, LLAMA_LINEARS) for linear in layer.values()]
    inputs = {i: torch.randn(tokens, i, device=llm.device, dtype=llm.dtype) for i in {l.in_features for l in linears}}
    r = measure(lambda: [F.linear(inputs[l.in_features], l.weight) for l in linears], *w["runs"]["gen"])
    gemm_flops = 2 * tokens * sum(l.weight.numel() for l in linears)
    return r | {"ms_per_context": r["ms"] / batch, "contexts_s": 1e3 * batch / r["ms"],
                "tflops": gemm_flops / r["ms"] / 1e9}


def greedy_tokens(llm, prompt: torch.Tensor, n: int, **generate_kwargs):
    """A callable that answers `prompt` (B, T) with exactly n greedy tokens (no EOS stops it) via HF generate."""
    ones = torch.ones_like(prompt)
    return lambda: llm.generate(prompt, attention_mask=ones, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                **generate_kwargs)


def decode(llm, prompt: torch.Tensor, w: dict, runs: tuple[int, int], s: flops.Shape, answer=None,
           **generate_kwargs) -> dict:
    """Time N greedy tokens after `prompt` (B, T): HF generate with `generate_kwargs`, or `answer()` if given."""
    batch, n = prompt.shape[0], w["new_tokens"]
    answer = answer or greedy_tokens(llm, prompt, n, **generate_kwargs)
    r = measure(answer, *runs)
    prefill = measure(lambda: llm(prompt, logits_to_keep=1), 1, 3)["ms"]
    log(f"  {(r['ms'] - prefill) / (n - 1):.2f} ms per decoding step at batch {batch}")  # kept by a killed run's log
    return r | {"tok_s": 1e3 * batch * n / r["ms"], "prefill_ms": prefill, "ms_per_step": (r["ms"] - prefill) / (n - 1),
                "decode_tok_s": 1e3 * batch * (n - 1) / (r["ms"] - prefill),
                "predicted_gib": predicted_gib(s, w["prompt"] + n, batch, kv_cache=True)}


@torch.no_grad()
def bench_decode(shine: Shine, s: flops.Shape, w: dict, args) -> dict:
    llm, runs, out = shine.llm, w["runs"]["decode"], {}
    prompts = {b: random_ids(b, w["prompt"], s.vocab, llm.device) for b in DECODE_BATCHES}
    loras = {b: generated_lora(shine, b, w) for b in DECODE_BATCHES}
    for b in DECODE_BATCHES:
        log(f"decode b{b}: base, hooks")
        out[f"b{b}"] = {"base": decode(llm, prompts[b], w, runs, s)}
        with lora_applied(llm, loras[b]):
            out[f"b{b}"]["hooks"] = decode(llm, prompts[b], w, runs, s)
            if args.profile == "decode" and b == 1:
                profile(greedy_tokens(llm, prompts[1], 16), args.out.parent / "profile_decode.txt")
    log("decode: merged")
    merge_times = {"merge_ms": merge_time(llm, loras[1], keep_on=None),
                   "merge_cpu_ms": merge_time(llm, loras[1], keep_on="cpu")}
    with lora_merged(llm, loras[1], keep_on=None):
        for b in DECODE_BATCHES:
            out[f"b{b}"]["merged"] = decode(llm, prompts[b], w, runs, s) | merge_times
    for b in DECODE_BATCHES:  # the base again: a drift over the run (clocks, heat) shows as base_after != base
        out[f"b{b}"]["base_after"] = decode(llm, prompts[b], w, runs, s)
        for mode in ("hooks", "merged", "base_after"):
            out[f"b{b}"][mode]["x_base"] = out[f"b{b}"][mode]["ms_per_step"] / out[f"b{b}"]["base"]["ms_per_step"]
    return out


def merge_time(llm, lora: dict, keep_on) -> float:
    """ms to merge one adapter into the weights, keeping the originals on `keep_on` (shine.merge_lora)."""
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    sync()
    t = time.perf_counter()
    originals = merge_lora(llm, lora, keep_on=keep_on)
    sync()
    ms = 1e3 * (time.perf_counter() - t)
    unmerge_lora(llm, originals)
    return ms


def compile_options(backend: str, fullgraph: bool) -> dict:
    """torch.compile keywords of a decoding step: CUDA graphs with inductor (a mode only inductor takes)."""
    return dict(fullgraph=fullgraph, backend=backend, mode="reduce-overhead" if backend == "inductor" else None)


def compiled_generate_kwargs(backend: str, fullgraph: bool) -> dict:
    """generate() keywords for a static KV cache whose decoding step HF compiles (keep the LoRA hooks first)."""
    from transformers import CompileConfig

    config = CompileConfig(**compile_options(backend, fullgraph))
    config._compile_all_devices = True  # HF compiles on GPUs only unless told so; the CPU smoke run checks tracing
    return dict(cache_implementation="static", compile_config=config)


def loop_answer(llm, prompt: torch.Tensor, n: int, backend: str, fullgraph: bool, step_cache: dict):
    """`decode`'s answer() for the loop part: evaluate.greedy_decode over a static KV cache, its one-token step
    compiled like HF's (`compile_options`); one step and one cache per batch size, kept in `step_cache`."""
    from transformers import StaticCache

    batch = prompt.shape[0]
    if batch not in step_cache:  # HF's generate also keeps its cache and only resets it
        step_cache[batch] = (torch.compile(llm.__call__, **compile_options(backend, fullgraph)),
                             StaticCache(config=llm.config, max_cache_len=prompt.shape[1] + n))
    step, cache = step_cache[batch]

    def answer():
        cache.reset()
        return greedy_decode(llm, prompt, torch.ones_like(prompt), n, pad_token_id=0, cache=cache, step=step)
    return answer


GUARDS_SKIPPED = "_guards_skipped"


@contextmanager
def guards_skipped(applied):
    """`applied()` with torch.compiler's skip_guard_eval_unsafe stance: only the guards that tell the existing
    graphs apart are checked (unsafe when a call needs a new graph: it would silently reuse an old one)."""
    with applied(), torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
        yield


def median_round(rounds: list[dict]) -> dict:
    """The round whose decoding step took the median time, with every round's step time beside it."""
    middle = sorted(rounds, key=lambda r: r["ms_per_step"])[(len(rounds) - 1) // 2]
    return middle | {"ms_per_step_rounds": [r["ms_per_step"] for r in rounds]}


def mark_static(lora: dict) -> None:
    """Mark every factor's address static: else CUDA graphs copy all 2 x 7 x L tensors at every replay."""
    for A, B in (pair for modules in lora.values() for pair in modules.values()):
        torch._dynamo.mark_static_address(A)
        torch._dynamo.mark_static_address(B)


@torch.no_grad()
def bench_compile(shine: Shine, s: flops.Shape, w: dict, args, loop: bool = False) -> dict:
    """The compile part, or with `loop` the loop part: the same modes and rounds, each answer made by
    evaluate.greedy_decode (the host waits for the GPU every 8 tokens, not after each) instead of HF generate."""
    llm, runs, errors = shine.llm, w["runs"]["compile"], []
    torch._dynamo.reset()  # another part's graphs would count towards this one's recompile limit
    keep_lora_hooks(llm)  # before the first compile: see the module docstring
    loras = {b: decoding_layout(generated_lora(shine, b, w)) for b in DECODE_BATCHES}  # read fastest compiled
    prompts = {b: random_ids(b, w["prompt"], s.vocab, llm.device) for b in DECODE_BATCHES}
    for lora in loras.values():
        mark_static(lora)
    for fullgraph in (True, False):  # a graph break costs speed, not correctness: fall back and say so
        kwargs, out, steps = compiled_generate_kwargs(args.compile_backend, fullgraph), {}, {}
        try:
            for b in DECODE_BATCHES:
                modes = {"hooks": partial(lora_applied, llm, loras[b]), "base": nullcontext}
                if b == 1:  # merged in place: the base's compiled step and CUDA graphs replay over the updated
                    # weights, no recompile per adapter (merge_lora writes into the tensors the graphs captured)
                    modes["merged"] = partial(lora_merged, llm, loras[1], keep_on=None)
                # each again once every graph exists, checking only the guards that tell the graphs apart: how
                # much of a step is dynamo's guard evaluation on the host (every kept hook's adapter is guarded)
                modes |= {f"{mode}{GUARDS_SKIPPED}": partial(guards_skipped, applied)
                          for mode, applied in modes.items()}
                rounds = {mode: [] for mode in modes}
                for r in range(COMPILE_ROUNDS):  # interleaved: the host's drift over the run hits every mode alike
                    for mode, applied in modes.items():
                        first = f", fullgraph={fullgraph} (compiling takes a minute or two)" if r == 0 else ""
                        log(f"compile b{b}, round {r + 1}: {mode}{first}")
                        with applied():
                            answer = loop_answer(llm, prompts[b], w["new_tokens"], args.compile_backend, fullgraph,
                                                 steps) if loop else None
                            rounds[mode].append(decode(llm, prompts[b], w, runs, s, answer, **kwargs))
                out[f"b{b}"] = {mode: median_round(results) for mode, results in rounds.items()}
            for b, modes in out.items():
                for mode in set(modes) - {"base", f"base{GUARDS_SKIPPED}"}:
                    base = modes[f"base{GUARDS_SKIPPED}" if mode.endswith(GUARDS_SKIPPED) else "base"]
                    modes[mode]["x_base"] = modes[mode]["ms_per_step"] / base["ms_per_step"]
            break
        except Exception as error:  # noqa: BLE001 - reported in the JSON; the other parts still count
            traceback.print_exc()
            errors.append(f"fullgraph={fullgraph}: {type(error).__name__}: {error}"[:2000])
            torch._dynamo.reset()
    drop_lora_hooks(llm)
    return out | ({"errors": errors} if errors else {})


def bench_train(shine: Shine, model, s: flops.Shape, w: dict, args, world: int = 1, rank: int = 0) -> dict:
    cfg, device, C, T = train.TrainConfig(), shine.memory.device, w["train_context"], w["answer"]
    optimizer = train.make_optimizer(shine, cfg)

    def make_batch(c: int, t: int) -> dict:
        context, answer = random_ids(1, c, s.vocab, device), random_ids(1, t, s.vocab, device)
        return {"context_ids": context, "context_mask": torch.ones_like(context), "input_ids": answer,
                "attention_mask": torch.ones_like(answer), "labels": answer.clone()}

    batch = make_batch(C, T)
    # train.py's steps vary in length: a compiled step then runs graphs with dynamic shapes (after one recompile)
    varied = [make_batch(C - k * C // 8, T - k * T // 8) for k in range(VARIED_STEPS)]
    precision = autocast if CUDA and not args.fsdp else nullcontext  # as train.main: FSDP casts by itself
    trained = [p for p in shine.parameters() if p.requires_grad]

    def step(b: dict = batch):
        train.loss_of_step(model, [b], world, precision)
        torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_flops = train.step_flops(s, [batch], cfg)  # what train.py logs: 3 x forward, LM head on T - 1 positions
    out, cudnn = {}, torch.backends.cuda.cudnn_sdp_enabled()
    forwards = {layer: layer.__dict__.get("forward") for layer in decoder_layers(shine.llm)}  # compiled, or none
    if not args.cudnn_attention:
        train.data.avoid_cudnn_attention()  # as train.py trains (the other parts keep torch's choice)
    try:
        for name in ("no_ckpt", "ckpt"):
            if name == "ckpt":
                shine.enable_activation_checkpointing()
            log(f"train {name}")
            try:
                r = out[name] = measure(step, *w["runs"]["train"])
                r |= {"tok_s": 1e3 * (C + T) / r["ms"], "tflops": step_flops / r["ms"] / 1e9,
                      # fp32 hypernetwork + gradient + 2 AdamW moments, sharded under FSDP (the LLM too with
                      # --fsdp-llm)
                      "predicted_gib": predicted_gib(s, C + shine.num_memory + T, hyper_bytes=16, hyper_shards=world,
                                                     llm_shards=world if args.fsdp_llm else 1)}
                r["mfu"] = r["tflops"] / args.peak_tflops
                if world > 1:
                    r["all_gpus_tok_s"] = world * r["tok_s"]
                if name == "no_ckpt" and world == 1:  # the same, over steps of several lengths (ms: per step)
                    log("train varied lengths")
                    v = out["varied_lengths"] = measure(lambda: [step(b) for b in varied], *w["runs"]["train"])
                    tokens = sum(b["context_ids"].numel() + b["input_ids"].numel() for b in varied)
                    v |= {"ms": v["ms"] / len(varied), "tok_s": 1e3 * tokens / v["ms"],
                          "tflops": train.step_flops(s, varied, cfg) / v["ms"] / 1e9}
                    v["mfu"] = v["tflops"] / args.peak_tflops
                if args.profile == "train":
                    profile(step, args.out.parent / f"profile_train_{name}.txt", write=rank == 0)
            except torch.OutOfMemoryError as error:
                optimizer.zero_grad(set_to_none=True)
                out[name] = {"error": f"OutOfMemoryError: {str(error)[:300]}"}
                torch.cuda.empty_cache()
    finally:  # undo enable_activation_checkpointing (decoding runs without it) and the attention backend choice
        for layer, forward in forwards.items():
            layer.__dict__.pop("forward", None)
            if forward is not None:
                layer.forward = forward
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
    return out


# ----------------------------------------------------------------------------- main
def print_table(results: dict, path: str = "") -> None:
    """One line per measurement (a dict with "ms") or error in the results."""
    for key, value in results.items():
        name = f"{path}/{key}".lstrip("/")
        if isinstance(value, dict) and "ms" in value:
            rate = next(f"{value[k]:.4g} {k[:-2]}/s" for k in ("contexts_s", "decode_tok_s", "tok_s") if k in value)
            cells = "".join(f"{value[k]:>{width}{f}}" if k in value else " " * width for k, f, width in
                            (("tflops", ".4g", 10), ("mfu", ".1%", 7), ("x_base", ".3f", 8), ("peak_gib", ".4g", 10),
                             ("predicted_gib", ".4g", 9)))
            print(f"{name:<36}{value['ms']:>10.2f}{rate:>22}{cells}")
        elif isinstance(value, dict):
            print_table(value, name)
        elif key in ("error", "errors"):
            print(f"{name:<36}{str(value)[:150]}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="qwen3-8b")
    p.add_argument("--out", type=Path, default=Path("results/speed.json"))
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    p.add_argument("--profile", choices=PARTS[:3], help="also write a torch.profiler table of this part next to --out")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)")
    p.add_argument("--compile-backend", default="inductor", help="inductor (CUDA graphs) or eager (smoke tests)")
    p.add_argument("--compile-layers", action="store_true", help="gen and train with Shine.compile_layers "
                   "(--compile-backend; train.py's --compile)")
    p.add_argument("--fsdp", action="store_true", help="train only, sharded like train.py --fsdp (under torchrun)")
    p.add_argument("--fsdp-llm", action="store_true", help="with --fsdp: shard the frozen LLM too (train.py's flag)")
    p.add_argument("--cudnn-attention", action="store_true", help="train with cuDNN attention (train.py's flag)")
    p.add_argument("--baseline", type=Path, help="a one-GPU JSON of this script: scaling efficiency for --fsdp")
    args = p.parse_args(argv)
    if args.fsdp_llm and not args.fsdp:
        p.error("--fsdp-llm needs --fsdp")
    if args.fsdp and "RANK" not in os.environ:
        p.error("--fsdp runs under torchrun: torchrun --nproc_per_node=2 benchmarks/speed.py --fsdp ...")
    if unknown := set(args.only.split(",")) - set(PARTS):
        p.error(f"--only: unknown parts {sorted(unknown)}; choose from {PARTS}")
    args.only = ["train"] if args.fsdp else [part for part in PARTS if part in args.only.split(",")]
    if args.compile_layers and not set(args.only) <= {"gen", "train"}:
        p.error("--compile-layers times gen and train: add --only gen,train")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_float32_matmul_precision("high")  # TF32 for the fp32 leftovers under autocast (the authors: fp32 + TF32)
    rank, world, device = train.setup_distributed() if args.fsdp else (0, 1, torch.device("cuda" if CUDA else "cpu"))
    w = SHAPES[args.shape]
    results = {"device": torch.cuda.get_device_name() if CUDA else f"cpu ({platform.machine()})", "gpus": world,
               "torch": torch.__version__, "transformers": transformers.__version__,
               "shape": args.shape, "peak_tflops": args.peak_tflops,
               **({"compiled_layers": args.compile_backend} if args.compile_layers else {}),
               **({"sharded": "hypernetwork and LLM" if args.fsdp_llm else "hypernetwork"} if args.fsdp else {}),
               **({"train_attention": "cudnn allowed" if args.cudnn_attention else "no cudnn"} if "train" in args.only
                  else {}),
               "lengths": {k: w[k] for k in ("context", "train_context", "answer", "prompt", "new_tokens")}}
    torch.manual_seed(0)
    log(f"building {args.shape} on {results['device']}")
    if args.fsdp:  # train.build_model itself, handed the random backbone instead of a download
        random_backbone = lambda name, dtype, device=device, **attn: (build_llm(args.shape, dtype, device), None)
        with mock.patch.object(train.data, "load_backbone", random_backbone):
            shine, model, _ = train.build_model(train.TrainConfig(fsdp=True, fsdp_llm=args.fsdp_llm), device, world)
    else:
        shine = model = Shine(build_llm(args.shape, torch.bfloat16, device))
    if args.compile_layers:  # compiled lazily, at each part's first (warm-up) call
        shine.compile_layers(backend=args.compile_backend)
    s = flops.Shape.from_config(shine.llm.config)
    log(f"built: {shine.parameter_report()}")
    for part in args.only:
        t = time.perf_counter()
        try:
            if part == "train":
                results[part] = bench_train(shine, model, s, w, args, world, rank)
            else:
                bench = {"gen": bench_gen, "decode": bench_decode, "compile": bench_compile,
                         "loop": partial(bench_compile, loop=True)}[part]
                results[part] = bench(shine, s, w, args)
        except Exception as error:  # noqa: BLE001 - an OOM or a crash in one part leaves the others standing
            traceback.print_exc()
            results[part] = {"error": f"{type(error).__name__}: {error}"[:2000]}
        gc.collect()  # what a part (or its error) left behind, before the next part
        if CUDA:
            torch.cuda.empty_cache()
        results[f"{part}_wall_s"] = time.perf_counter() - t
        if rank == 0:
            args.out.write_text(json.dumps(results, indent=2))  # after every part: a later crash keeps the rest
    if args.fsdp and args.baseline:
        one_gpu = json.loads(args.baseline.read_text()).get("train", {})
        for name, r in results["train"].items():
            if isinstance(r, dict) and "tok_s" in r and "tok_s" in one_gpu.get(name, {}):
                r["scaling_efficiency"] = r["tok_s"] / one_gpu[name]["tok_s"]  # per-GPU tok/s over one GPU's
    results["total_wall_s"] = time.perf_counter() - T0
    if rank == 0:
        args.out.write_text(json.dumps(results, indent=2))
        print(f"\n{'':<36}{'ms':>10}{'throughput':>22}{'TFLOP/s':>10}{'MFU':>7}{'x base':>8}{'peak GiB':>10}"
              f"{'B.6 GiB':>9}")
        print_table({k: v for k, v in results.items() if isinstance(v, dict) and k != "lengths"})
        log(f"wrote {args.out} ({results['device']})")
    if world > 1:
        torch.distributed.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
