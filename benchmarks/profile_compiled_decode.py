"""Where a compiled decoding step's time goes: torch.profiler tables for the base and the kept LoRA hooks (issue 6).

    python benchmarks/profile_compiled_decode.py --out-dir results     # Qwen3-8B shape, batch 1, ~4 minutes
    python benchmarks/profile_compiled_decode.py --shape tiny --backend eager --out-dir /tmp/p   # CPU smoke run

Decodes as speed.py's `compile` part (static KV cache, HF compiling the step with CUDA graphs, one adapter per
sequence in `shine.decoding_layout`), then profiles `--tokens` decoding steps of each mode, guarded and with
dynamo's guards skipped, and writes one table per mode (GPU kernels by time, then host work by time) to
`profile_compiled_decode_<shape>_b<batch>_<mode>.txt`. It prints per step: the compiled region's GPU time and
dynamo's cache lookup (evaluating the guards that pick the graph) on the host.
"""
import argparse
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import speed  # noqa: E402
from shine import decoding_layout, keep_lora_hooks, lora_applied, lora_shapes  # noqa: E402


def per_step_ms(prof, name: str, steps: int, device: bool) -> float:
    """Total time of the profiler events whose name contains `name`, per decoding step (GPU or host time)."""
    events = [e for e in prof.key_averages() if name in e.key]
    total = sum(e.device_time_total if device else e.cpu_time_total for e in events)
    return total / 1e3 / steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(speed.SHAPES), default="qwen3-8b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=16, help="decoding steps profiled per mode")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (eager: smoke runs)")
    p.add_argument("--out-dir", type=Path, default=Path("results"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    w, rank = speed.SHAPES[args.shape], 8
    llm = speed.build_llm(args.shape, torch.bfloat16, device)
    keep_lora_hooks(llm)  # before the first compile (speed.py's docstring says why)
    g = torch.Generator(device=device).manual_seed(0)
    factor = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16) * 0.01
    shapes, layers = lora_shapes(llm), range(llm.config.num_hidden_layers)
    lora = decoding_layout({l: {n: (factor(args.batch, i, rank), factor(args.batch, rank, o))
                                for n, (i, o) in shapes.items()} for l in layers})
    speed.mark_static(lora)
    prompt = speed.random_ids(args.batch, w["prompt"], llm.config.vocab_size, device)
    kwargs = speed.compiled_generate_kwargs(args.backend, fullgraph=True)
    n = args.tokens + 1  # the first new token comes from the (eager) prefill
    generate = speed.greedy_tokens(llm, prompt, n, **kwargs)
    modes = {"base": nullcontext, "hooks": partial(lora_applied, llm, lora)}
    for applied in modes.values():  # compile every graph before any guard is skipped
        with applied(), torch.no_grad():
            generate(), generate()
    modes |= {f"{m}{speed.GUARDS_SKIPPED}": partial(speed.guards_skipped, a) for m, a in modes.items()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {}
    for mode, applied in modes.items():
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with applied(), torch.no_grad(), profile(activities=activities) as prof:
            generate()
            torch.cuda.synchronize() if device.type == "cuda" else None
        table = prof.key_averages()
        path = args.out_dir / f"profile_compiled_decode_{args.shape}_b{args.batch}_{mode}.txt"
        path.write_text(f"{mode}: {args.tokens} compiled decoding steps at batch {args.batch}, {args.shape}, "
                        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}\n\n"
                        + (table.table(sort_by="device_time_total", row_limit=40, max_name_column_width=90)
                           if device.type == "cuda" else "")
                        + table.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90))
        gpu = per_step_ms(prof, "Torch-Compiled Region", args.tokens, device=True) if device.type == "cuda" else None
        report[mode] = {"gpu_ms_per_step": gpu, "table": str(path),
                        "cache_lookup_ms_per_step": per_step_ms(prof, "TorchDynamo Cache Lookup", args.tokens, False)}
        print(f"{mode:22s} compiled region on the GPU {gpu or float('nan'):7.3f} ms a step, dynamo cache lookup "
              f"on the host {report[mode]['cache_lookup_ms_per_step']:6.3f} ms a step", flush=True)
    return report


if __name__ == "__main__":
    main()
