"""What a generated LoRA adds to a compiled decoding step, by the memory layout of its factors (issue 6).

    python benchmarks/decode_lora_layout.py --out results/speed_h100_decode_lora_layout.json   # ~1 min, one H100
    python benchmarks/decode_lora_layout.py --shape tiny --backend eager --out /tmp/l.json  # CPU smoke run (CI)

A stack of Qwen3-8B-shaped layers holding only the seven target linears (attention is replaced by an elementwise
mix of q, k and v: the LoRA's cost does not depend on it), bf16, random weights. shine.py's own hooks apply the
adapters (`keep_lora_hooks`, `lora_applied`) and each layer's forward is compiled as `Shine.compile_layers` does.
One decoding step (one token per sequence through all layers) is captured in a CUDA graph and replayed: median
of the replays, timed with CUDA events. Per batch: no adapter ("base"); one adapter per sequence as
`lora_from_states` lays it out ("generated": A's rank axis innermost); the same adapter after
`shine.decoding_layout` ("decoding": rank axis outermost, as peft stores it).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shine import (LLAMA_LINEARS, decoding_layout, keep_lora_hooks, lora_applied, lora_from_states,  # noqa: E402
                   lora_shapes, num_memory_tokens)

SHAPES = {"qwen3-8b": dict(hidden=4096, kv=1024, intermediate=12288, layers=36),
          "tiny": dict(hidden=64, kv=32, intermediate=192, layers=2)}
RANK, BATCHES = 8, (1, 16)


class LinearsLayer(nn.Module):
    """A decoder layer's linears, named and wired as in Llama/Qwen3; norms without weights, a toy attention."""

    def __init__(self, hidden: int, kv: int, intermediate: int):
        super().__init__()
        self.self_attn, self.mlp = nn.Module(), nn.Module()
        for name, (i, o) in dict(q_proj=(hidden, hidden), k_proj=(hidden, kv), v_proj=(hidden, kv),
                                 o_proj=(hidden, hidden)).items():
            setattr(self.self_attn, name, nn.Linear(i, o, bias=False))
        for name, (i, o) in dict(gate_proj=(hidden, intermediate), up_proj=(hidden, intermediate),
                                 down_proj=(intermediate, hidden)).items():
            setattr(self.mlp, name, nn.Linear(i, o, bias=False))

    def forward(self, x):  # (b, t, H)
        a, m = self.self_attn, self.mlp
        h = F.rms_norm(x, x.shape[-1:])
        q, k, v = a.q_proj(h), a.k_proj(h), a.v_proj(h)
        x = x + a.o_proj(q * torch.sigmoid(k + v).repeat(1, 1, q.shape[-1] // k.shape[-1]))
        h = F.rms_norm(x, x.shape[-1:])
        return x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))


class LinearsModel(nn.Module):
    def __init__(self, hidden: int, kv: int, intermediate: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(LinearsLayer(hidden, kv, intermediate) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def timed_step(model, x, device: torch.device, replays: int) -> float:
    """ms of one step through all layers: a CUDA graph's replays on a GPU, plain calls on a CPU (smoke runs)."""
    with torch.no_grad():
        if device.type != "cuda":
            model(x)
            t0 = time.perf_counter()
            model(x)
            return (time.perf_counter() - t0) * 1e3
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and warm up outside the capture
            for _ in range(3):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(x)
        times = []
        for _ in range(replays + 10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times[10:])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), default="qwen3-8b")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (eager: smoke runs)")
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("results/speed_decode_lora_layout.json"))  # speed*: rendered
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    s = SHAPES[args.shape]
    with torch.device(device):
        model = LinearsModel(**s).to(torch.bfloat16).eval()
    for linear in model.modules():
        if isinstance(linear, nn.Linear):
            nn.init.normal_(linear.weight, std=0.02)
    shapes = lora_shapes(model, LLAMA_LINEARS)
    keep_lora_hooks(model)
    for layer in model.layers:  # regional compilation, as Shine.compile_layers: one graph for all layers
        layer.forward = torch.compile(layer.forward, backend=args.backend, dynamic=False)
    results, memory = {}, num_memory_tokens(RANK, shapes, s["hidden"])
    for batch in BATCHES:
        x = torch.randn(batch, 1, s["hidden"], device=device, dtype=torch.bfloat16)
        states = torch.randn(batch, s["layers"], memory, s["hidden"], device=device)  # stands in for the M2P's output
        generated = {l: {n: (A.contiguous(), B.contiguous()) for n, (A, B) in m.items()}  # as speed.py's adapters
                     for l, m in lora_from_states(states, shapes, RANK, dtype=torch.bfloat16).items()}
        row = {"base": timed_step(model, x, device, args.replays)}
        for name, lora in (("generated", generated), ("decoding", decoding_layout(generated))):
            with lora_applied(model, lora):
                row[name] = timed_step(model, x, device, args.replays)
        results[f"b{batch}"] = {k: {"ms": ms, "x_base": ms / row["base"]} for k, ms in row.items()}
        for k, ms in row.items():
            print(f"batch {batch:2d}  {k:9s}  {ms:8.3f} ms  x{ms / row['base']:.3f}", flush=True)
    report = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                  shape=args.shape, rank=RANK, backend=args.backend, replays=args.replays, results=results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
