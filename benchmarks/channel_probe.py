"""Does the context reach the generated LoRA? A short reconstruction-only training run that says, as it goes.

    python benchmarks/channel_probe.py --lora-scale 2.7e-4 --out results/shine-135m/channel/s2.7e-4.json
    for s in 2.7e-3 2.7e-4; do python benchmarks/channel_probe.py --lora-scale $s --out probe_$s.json & done; wait

A fresh hypernetwork on the backbone learns to reconstruct short texts (--ctx tokens, one text per example,
lambda = 1: train.pretrain_example), at a constant learning rate after a short warmup so that runs cut at
--max-seconds compare step for step. Every --eval-every steps, held-out WikiText-2 test chunks are scored as in
benchmarks/recon_curves.py: under their own LoRA ("own"), under a neighbour's LoRA ("other") and with no LoRA
("none"). none - own is all the LoRA does; other - own is the part that comes from the text itself: the channel.
A hypernetwork can lower "own" a lot by writing the same domain LoRA for every text; only the channel answers
questions about a context.

Why it exists: SHINE-135M's pretraining (benchmarks/shine_135m.sh) ended with reconstruction and completion losses
equal to three decimals, i.e. a channel near zero. Runs of this probe side by side on one H100 found the cause in
the generated LoRA's scale s (results/shine-135m/channel_probe.json). Texts: by default the bundled SQuADShifts and
CoQA samples (offline); --texts takes the full files of the SHINE-135M data list.

    python benchmarks/channel_probe.py --inspect checkpoints/shine-smollm2-135m --out spread.json   # no training

--inspect prints, per layer, how much a checkpoint's memory states differ between contexts (memory_spread).
"""
import argparse
import json
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import data  # noqa: E402
import recon_curves  # noqa: E402
import train  # noqa: E402
from shine import Shine, ShineConfig  # noqa: E402

PRESET = train.PRESETS["smollm2"]["all"]  # the SHINE-135M hypernetwork's sizes and s
DEFAULT_TEXTS = ",".join(str(data.BUNDLED[k]) for k in (
    "squadshifts-new_wiki", "squadshifts-nyt", "squadshifts-reddit", "squadshifts-amazon", "coqa"))


def text_chunks(tokenizer, texts: list[str], length: int, limit: int | None = None) -> list[list[int]]:
    """Consecutive `length`-token chunks of every text (a last piece of at least length / 4 tokens is kept)."""
    out = []
    for text in texts:
        ids = data.encode_context(tokenizer, text)
        out += [ids[i:i + length] for i in range(0, len(ids), length) if len(ids) - i >= max(1, length // 4)]
    return out[:limit]


def channel(shine: Shine, examples: list[dict], batch_size: int, pad_id: int) -> dict[str, float]:
    """Mean per-example reconstruction loss under each text's own LoRA, a neighbour's LoRA and none (nats)."""
    own = recon_curves.example_losses(shine, examples, batch_size, pad_id)
    other = recon_curves.example_losses(shine, recon_curves.with_other_contexts(examples), batch_size, pad_id)
    none = recon_curves.example_losses(shine, examples, batch_size, pad_id, base=True)
    mean = lambda v: sum(v) / len(v)
    return {"own": mean(own), "other": mean(other), "none": mean(none), "channel": mean(other) - mean(own)}


@torch.no_grad()
def memory_spread(shine: Shine, context_ids: torch.Tensor, context_mask: torch.Tensor) -> list[dict[str, float]]:
    """Per LLM layer: RMS and largest |value| of the memory states, and how much they differ between contexts (RMS
    of each context's deviation from the batch mean, relative to the RMS). Near 0: the M2P sees the same memory
    whatever the context, so it can only write one LoRA for all of them. Contexts (B, N), B >= 2."""
    if context_ids.shape[0] < 2:
        raise ValueError(f"the spread across contexts needs at least 2 contexts, got {context_ids.shape[0]}")
    states = shine.memory_states(context_ids, context_mask).float()  # (B, L, M, H)
    rms = states.pow(2).mean((0, 2, 3)).sqrt()
    spread = (states - states.mean(0, keepdim=True)).pow(2).mean((0, 2, 3)).sqrt()
    peak = states.abs().amax((0, 2, 3))
    return [{"rms": r, "max_abs": m, "across_contexts": d / r} for r, m, d in
            zip(rms.tolist(), peak.tolist(), spread.tolist())]


def inspect(model: str, checkpoint: str | None, contexts: int = 8, length: int = 256) -> list[dict[str, float]]:
    """memory_spread of a checkpoint (or a fresh hypernetwork) on the first bundled SQuAD dev contexts."""
    llm, tokenizer = data.load_backbone(model)
    shine = Shine.from_pretrained(llm, checkpoint) if checkpoint else Shine(
        llm, ShineConfig(meta_lora_rank=PRESET["meta_lora_rank"], lora_scale=PRESET["lora_scale"]))
    records = data.load_qa("squad", data.BUNDLED["squad"])[0][:contexts]
    ids, mask = data.left_pad([data.encode_context(tokenizer, r.context, length) for r in records], tokenizer.pad_token_id)
    return memory_spread(shine.eval(), ids, mask)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--texts", default=DEFAULT_TEXTS, help="comma-separated training text files (data.load_texts)")
    p.add_argument("--lora-scale", type=float, default=PRESET["lora_scale"],
                   help="s of the generated LoRA (default: train.py's smollm2 preset)")
    p.add_argument("--memory-norm", default=PRESET["memory_norm"],
                   help="shine.MEMORY_NORMS: how the M2P reads the memory states (default: the smollm2 preset's)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--meta-lora-rank", type=int, default=PRESET["meta_lora_rank"])
    p.add_argument("--lora-rank", type=int, default=ShineConfig.lora_rank,
                   help="r of the generated LoRA; the memory tokens grow with it (M = ceil(rD/H))")
    p.add_argument("--ctx", type=int, default=128, help="tokens per text")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--max-seconds", type=float, default=float("inf"), help="stop earlier, after this much time")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--val", type=int, default=64, help="held-out WikiText-2 chunks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON, rewritten after every evaluation")
    p.add_argument("--inspect", metavar="CKPT", help="no training: memory_spread of CKPT ('fresh': a new one) to --out")
    args = p.parse_args(argv)
    if args.inspect:
        layers = inspect(args.model, None if args.inspect == "fresh" else args.inspect)
        for l, r in enumerate(layers):
            print(f"layer {l:2d}: rms {r['rms']:9.3f}  max |x| {r['max_abs']:9.1f}  across contexts {r['across_contexts']:.3f}")
        Path(args.out).write_text(json.dumps({"checkpoint": args.inspect, "layers": layers}, indent=1))
        return {"layers": layers}
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        data.avoid_cudnn_attention()
    llm, tokenizer = data.load_backbone(args.model, torch.bfloat16 if device.type == "cuda" else None, device)
    shine = Shine(llm, ShineConfig(lora_rank=args.lora_rank, meta_lora_rank=args.meta_lora_rank,
                                   lora_scale=args.lora_scale, memory_norm=args.memory_norm)).to(device)
    rng, eot, pad_id = random.Random(args.seed), train.eot_id(tokenizer), tokenizer.pad_token_id
    example = lambda ids: train.pretrain_example(tokenizer, [ids], rng, eot, recon_prob=1.0)
    pool = text_chunks(tokenizer, [t for f in args.texts.split(",") for t in data.load_texts(f)], args.ctx)
    held_out = [example(c) for c in text_chunks(tokenizer, data.load_texts(data.BUNDLED["wikitext-2"]), args.ctx,
                                                 args.val)]
    cfg = train.TrainConfig(lr=args.lr)  # AdamW, weight decay and clipping as train.py
    optimizer = train.make_optimizer(shine, cfg)
    autocast = lambda: torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    report = {"config": vars(args), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "train_texts": len(pool), "memory_tokens": shine.num_memory, "curve": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def evaluate(step: int, loss: float | None) -> None:
        shine.eval()
        point = {"step": step, "train_loss": loss, **channel(shine, held_out, args.batch_size, pad_id),
                 "seconds": time.perf_counter() - start}
        shine.train()
        report["curve"].append(point)
        out.write_text(json.dumps(report, indent=1))
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in point.items()), flush=True)

    start, step, loss = time.perf_counter(), 0, None
    evaluate(0, None)
    warmup = min(30, args.steps)
    while step < args.steps and time.perf_counter() - start < args.max_seconds:
        batch = {k: v.to(device) for k, v in train.collate(
            [example(pool[rng.randrange(len(pool))]) for _ in range(args.batch_size)], pad_id).items()}
        lr = args.lr * min(1.0, (step + 1) / warmup)
        step, loss = step + 1, train.optimizer_step(shine, shine, optimizer, [batch], lr, cfg, 1, autocast)
        if not math.isfinite(loss):
            raise SystemExit(f"loss {loss} at step {step}: lower --lr")
        if step % args.eval_every == 0:
            evaluate(step, loss)
    if report["curve"][-1]["step"] != step:
        evaluate(step, loss)
    return report


if __name__ == "__main__":
    main()
