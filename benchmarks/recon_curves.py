"""Figure 5 analogue: how well SHINE's generated LoRA reconstructs or completes held-out WikiText-2 test text.

    python benchmarks/recon_curves.py --model smollm2-135m --base --ckpt pretrain=DIR --ckpt final=DIR \
        --out results/shine-135m/recon_curves.json

The protocol is pretraining's (section 5.1, train.pretrain_example with one text): the hypernetwork reads a text
(reconstruction) or the text without its last k ~ U(0.1N, 0.3N) tokens (completion) and writes a LoRA; the LLM,
which never sees the context, then answers a "<RECON>" / "<COMP>" user turn with the whole text. Each example's
loss is the mean cross-entropy over its answer tokens (the text and the end-of-turn token), PPL = exp(loss).
`--base` adds the backbone with no LoRA at all: how well the text can be guessed without the context. For each
checkpoint, the control "recon_other" reconstructs each text under the LoRA of another text of similar length: the
gap between it and "recon" is what the LoRA knows about its own text (completion hides only the text's tail).

Texts: consecutive token chunks of the WikiText-2 test articles (data/wikitext-2, never trained on), lengths drawn
log-uniformly in [first edge, last edge] (seeded), up to --per-bucket per length bucket; an example's bucket is its
text length N. Per bucket: median, P10 and P90 of loss and PPL, as Figure 5.
"""
import argparse
import json
import math
import random
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import train  # noqa: E402
from shine import Shine, ShineConfig  # noqa: E402

TASKS = {"recon": 1.0, "comp": 0.0}  # task -> recon_prob of train.pretrain_example
# the control: reconstruction under the LoRA written from ANOTHER text of about the same length. Its gap to "recon"
# is what the LoRA carries about its own text; "comp" differs from "recon" only in the text's last 10-30%.
CONTROL = "recon_other"


def bucket_of(n: int, edges: list[int]) -> int | None:
    """Index of the bucket [edges[i], edges[i+1]) holding n (the last bucket includes its upper edge)."""
    for i in range(len(edges) - 1):
        if edges[i] <= n < edges[i + 1] or (i == len(edges) - 2 and n == edges[-1]):
            return i
    return None


def chunks(token_lists: list[list[int]], edges: list[int], per_bucket: int, seed: int) -> list[list[int]]:
    """Consecutive chunks of each article, lengths log-uniform in [edges[0], edges[-1]]; then up to per_bucket
    chunks drawn (seeded) from each bucket, sorted by length."""
    rng, by_bucket = random.Random(seed), [[] for _ in edges[:-1]]
    for ids in token_lists:
        start = 0
        while True:
            n = round(math.exp(rng.uniform(math.log(edges[0]), math.log(edges[-1]))))
            if start + n > len(ids):
                break
            by_bucket[bucket_of(n, edges)].append(ids[start:start + n])
            start += n
    picked = [c for group in by_bucket for c in rng.sample(group, min(per_bucket, len(group)))]
    return sorted(picked, key=len)


def with_other_contexts(examples: list[dict]) -> list[dict]:
    """Each example with the next one's context (examples sorted by length: a neighbour of similar length)."""
    return [{**e, "context": examples[(i + 1) % len(examples)]["context"]} for i, e in enumerate(examples)]


def zero_lora(shine: Shine) -> dict:
    """A rank-1 LoRA of zeros: the hooks run and add nothing, so "base" goes through the same code as SHINE."""
    device = shine.memory.device
    return {l: {m: (torch.zeros(i, 1, device=device), torch.zeros(1, o, device=device))
                for m, (i, o) in shine.shapes.items()} for l in range(shine.num_layers)}


@torch.no_grad()
def example_losses(shine: Shine, examples: list[dict], batch_size: int, pad_id: int, base: bool = False) -> list[float]:
    """Mean answer-token cross-entropy of each example, under its generated LoRA (or none, base=True)."""
    device = shine.memory.device
    autocast = lambda: torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    out = []
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in train.collate(examples[i:i + batch_size], pad_id).items()}
        with autocast():
            lora = zero_lora(shine) if base else shine.generate_lora(batch["context_ids"], batch["context_mask"])
            tokens = shine.answer_loss(lora, batch["input_ids"], batch["attention_mask"], batch["labels"], "none")
        counts = (batch["labels"][:, 1:] != -100).sum(1).tolist()  # answer_loss keeps row-major token order
        out += [t.mean().item() for t in tokens.float().split(counts)]
    return out


def summarize(lengths: list[int], losses: list[float], edges: list[int]) -> dict:
    """Per bucket: n and the median, P10, P90 of loss and of PPL (numpy's linear percentiles)."""
    buckets = [bucket_of(n, edges) for n in lengths]
    out = {"n": [], "loss": {"median": [], "p10": [], "p90": []}, "ppl": {"median": [], "p10": [], "p90": []}}
    for b in range(len(edges) - 1):
        values = np.array([x for x, k in zip(losses, buckets) if k == b])
        out["n"].append(len(values))
        for name, v in (("loss", values), ("ppl", np.exp(values))):
            stats = np.percentile(v, [50, 10, 90]).tolist() if len(v) else [None] * 3
            for key, s in zip(("median", "p10", "p90"), stats):
                out[name][key].append(s)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ckpt", action="append", default=[], help="NAME=DIR, a SHINE checkpoint (repeatable)")
    p.add_argument("--base", action="store_true", help="also the backbone without any LoRA")
    p.add_argument("--buckets", default="64,128,256,512,1150", help="edges of the text-length buckets (tokens)")
    p.add_argument("--per-bucket", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=str(ROOT / "results" / "shine-135m" / "recon_curves.json"))
    args = p.parse_args(argv)
    edges = [int(e) for e in args.buckets.split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm, tokenizer = data.load_backbone(args.model, torch.bfloat16 if device == "cuda" else torch.float32, device)
    pad_id = tokenizer.pad_token_id
    articles = [tokenizer(t, add_special_tokens=False).input_ids for t in data.load_texts(data.BUNDLED["wikitext-2"])]
    texts = chunks(articles, edges, args.per_bucket, args.seed)
    eot = train.eot_id(tokenizer)
    examples = {task: [train.pretrain_example(tokenizer, [ids], random.Random(args.seed + i), eot, prob)
                       for i, ids in enumerate(texts)] for task, prob in TASKS.items()}
    lengths = [len(t) for t in texts]

    out_path = Path(args.out)
    report = json.loads(out_path.read_text()) if out_path.is_file() else {}
    config = {"model": args.model, "buckets": edges, "per_bucket": args.per_bucket, "seed": args.seed}
    if report.get("config") != config or report.get("lengths") != lengths:
        report = {"config": config, "lengths": lengths, "checkpoints": {}, "losses": {}, "summary": {}}
    models = [("base", None)] * args.base + [tuple(spec.split("=", 1)) for spec in args.ckpt]
    for name, ckpt in models:
        shine = (Shine.from_pretrained(llm, ckpt) if ckpt else Shine(llm, ShineConfig(lora_rank=1, meta_lora_rank=1, m2p_layers=1))).eval()
        report["checkpoints"][name] = ckpt
        report.setdefault("devices", {})[name] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        tasks = examples if ckpt is None else examples | {CONTROL: with_other_contexts(examples["recon"])}
        report["losses"][name] = {t: example_losses(shine, ex, args.batch_size, pad_id, ckpt is None)
                                  for t, ex in tasks.items()}
        report["summary"][name] = {t: summarize(lengths, v, edges) for t, v in report["losses"][name].items()}
        for task, s in report["summary"][name].items():
            print(f"{name:<9}{task:<6} median PPL by bucket " + "  ".join(
                f"{edges[b]}-{edges[b + 1]}: {m:.2f}" for b, m in enumerate(s["ppl"]["median"]) if m is not None))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1))
    counts = [sum(bucket_of(n, edges) == b for n in lengths) for b in range(len(edges) - 1)]
    print(f"wrote {out_path} ({len(texts)} texts, per bucket {counts})")
    return report


if __name__ == "__main__":
    main()
