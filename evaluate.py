"""Evaluate SHINE and its baselines on the paper's QA benchmarks (sections 5.2-5.3: Tables 1-3, Figure 6).

    python evaluate.py                        # bundled HotpotQA sample on smollm2-135m, offline: naive + in-context
    python evaluate.py --bench squad --limit 1000 --shine-ckpt checkpoints/shine-smollm2-135m
    python evaluate.py --bench msmarco-mqa --data-file mqa.jsonl --method naive,sft,shine --shine-ckpt DIR
    python evaluate.py --bench hotpotqa --model Qwen/Qwen3-8B --shine-ckpt DIR --data-file hub --out r.json

Methods: naive (question only), in-context (context in the prompt), sft (a LoRA of the generated rank trained on
the passage, Table 3's "train on passage", or on the QA conversation for msmarco-mqa, Table 1; opt-in: it trains
once per context), shine (a LoRA generated from the context), shine-other (a control, not in the paper: each question
answered with the LoRA of another record's context, so what SHINE scores beyond it is what its own context brought);
all = naive, in-context, shine. F1 / EM follow the
official SQuAD v1.1 script (lower-case, drop punctuation and a/an/the, squash whitespace, max over gold answers,
MuSiQue's aliases included), plus HotpotQA's rule on hotpotqa and 2wiki (a yes/no/noanswer mismatch scores 0).
Amortizable time (LoRA generation or SFT) and generation time are seconds per context, as Table 1.

Notable choices:
- Each context has its own LoRA within a batch; it is made once and serves all turns of a conversation, whose
  history is the model's own raw replies (Figure 6).
- SQuAD-N fills each context with shuffled (--seed) paragraphs of other articles up to N tokens of the backbone's
  tokenizer (Table 2, after Generative Adapter).
- sft on msmarco-mqa trains on the very QA pairs it is then asked (a test row holds one conversation; the paper
  used 5 per context): an upper bound for SFT.
"""
import argparse
import inspect
import json
import os
import platform
import random
import re
import resource
import string
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

import data
from convert import load_any_checkpoint  # ours, the authors' released files, or a hub id of either
from shine import LLAMA_LINEARS, decoder_layers, lora_applied, lora_shapes

ROOT = Path(__file__).resolve().parent
DEFAULT_CKPT = ROOT / "checkpoints" / "shine-smollm2-135m"  # used for smollm2-135m when it exists
SQUAD_N = {"squad-512": 512, "squad-1k": 1024, "squad-2k": 2048}
BENCHES = {b: b for b in ("squad", "msmarco-v1", "msmarco-v2", "hotpotqa", "musique", "2wiki", "msmarco-mqa")} | {
    b: "squad" for b in SQUAD_N}  # bench -> dataset of data.load_qa
YES_NO_RULE = {"hotpotqa", "2wiki"}  # benches whose official scorer is HotpotQA's
METHODS = ("naive", "in-context", "sft", "shine", "shine-other")
SHINE_METHODS = {"shine", "shine-other"}  # results that depend on --shine-ckpt


# ----------------------------------------------------------------------------- scoring
def normalize_answer(s: str) -> str:
    """The official SQuAD v1.1 normalisation: lower-case, drop punctuation and articles, squash whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def f1_score(prediction: str, gold: str, yes_no_rule: bool = False) -> float:
    pred, truth = normalize_answer(prediction), normalize_answer(gold)
    if yes_no_rule and pred != truth and ({pred, truth} & {"yes", "no", "noanswer"}):
        return 0.0  # HotpotQA: a yes/no/noanswer answer must match exactly
    common = sum((Counter(pred.split()) & Counter(truth.split())).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred.split()), common / len(truth.split())
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, golds: list[str], yes_no_rule: bool = False) -> tuple[float, float]:
    """(F1, EM) of one prediction, the max over the gold answers."""
    return (max(f1_score(prediction, g, yes_no_rule) for g in golds),
            max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds))


def clean_answer(raw: str) -> str:
    """What gets scored: no think block, no leading "Answer:", the first non-empty line."""
    text = raw.split("</think>")[-1].split("<think>")[0]
    text = re.sub(r"^\s*(final\s+)?answer\s*:\s*", "", text, flags=re.I)
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


# ----------------------------------------------------------------------------- benchmarks
def with_distractors(records: list[data.QARecord], tokenizer, target: int, seed: int = 0) -> list[data.QARecord]:
    """SQuAD-N: each context plus shuffled paragraphs of other articles, filled up to `target` tokens, then
    one more paragraph if it lands nearer to `target`."""
    rng = random.Random(seed)
    article = lambda r: r.id.split("#")[0]  # data.load_qa names SQuAD records "<title>#..."
    pool = list({r.context: article(r) for r in records}.items())
    size = {c: len(data.encode_context(tokenizer, c)) + 1 for c, _ in pool}  # +1: the "\n\n" separator
    out = []
    for r in records:
        others = [c for c, a in rng.sample(pool, len(pool)) if a != article(r) and c != r.context]
        parts, n = [r.context], size[r.context]
        for c in others:
            if n + size[c] <= target:
                parts, n = parts + [c], n + size[c]
        last = next((c for c in others if c not in parts and n + size[c] - target < target - n), None)
        parts += [last] if last else []
        rng.shuffle(parts)
        out.append(data.QARecord("\n\n".join(parts), r.qa, r.id))
    return out


def load_bench(bench: str, data_file: str | None, tokenizer, seed: int = 0) -> tuple[list[data.QARecord], int]:
    """Records of a bench (one question each, or whole conversations for msmarco-mqa) and the skipped count."""
    if bench not in BENCHES:
        raise ValueError(f"unknown bench {bench!r}; choose from {', '.join(BENCHES)}")
    name = BENCHES[bench]
    source = data.BUNDLED.get(name) if data_file is None else None if data_file == "hub" else data_file
    records, skipped = data.load_qa(name, source, mode="mqa" if bench == "msmarco-mqa" else "1qa")
    if bench in SQUAD_N:
        records = with_distractors(records, tokenizer, SQUAD_N[bench], seed)
    return records, skipped


# ----------------------------------------------------------------------------- methods
def take(lora, rows: list[int]):
    """The per-example LoRAs of some rows of a batch."""
    index = torch.tensor(rows, device=next(iter(lora[0].values()))[0].device)
    return {l: {m: (A[index], B[index]) for m, (A, B) in mods.items()} for l, mods in lora.items()}


def other_contexts(records: list[data.QARecord]) -> list[str]:
    """For each record, the context of the next record (cyclically) whose context differs from its own: shine-other's
    contexts. Raises if all records share one context."""
    contexts = [r.context for r in records]
    if len(set(contexts)) < 2:
        raise ValueError("shine-other needs records with at least two different contexts")
    n = len(contexts)
    return [next(contexts[(i + k) % n] for k in range(1, n) if contexts[(i + k) % n] != c)
            for i, c in enumerate(contexts)]


def train_sft_lora(model, tokenizer, record: data.QARecord, rank: int, targets: tuple[str, ...], epochs: int,
                   lr: float, chat: bool, system: str | None, seed: int):
    """Train one rank-r LoRA on the target linears with AdamW, through shine.py's hooks: next-token loss on the
    passage text, or (chat=True) answer loss on the record's QA conversation. Returns A (1, I, r), B (1, r, O)."""
    g, dev = torch.Generator().manual_seed(seed), model.device
    lora = {l: {m: ((torch.randn(i, rank, generator=g) / i ** 0.5).to(dev).requires_grad_(),  # fp32 master copy
                    torch.zeros(rank, o, device=dev, requires_grad=True))  # B = 0: starts as a no-op
                for m, (i, o) in lora_shapes(model, targets).items()} for l in range(len(decoder_layers(model)))}
    if chat:
        ids, labels = data.encode_chat(tokenizer, [(q, a[0]) for q, a in record.qa], system)
    else:
        ids = labels = data.encode_context(tokenizer, record.context)
    ids, labels = torch.tensor([ids], device=dev), torch.tensor([labels], device=dev)
    optimizer = torch.optim.AdamW([t for mods in lora.values() for ab in mods.values() for t in ab], lr=lr)
    with torch.enable_grad(), lora_applied(model, lora):
        for _ in range(epochs):
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return {l: {m: (A.detach()[None], B.detach()[None]) for m, (A, B) in mods.items()} for l, mods in lora.items()}


@torch.no_grad()
def greedy_decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  pad_token_id: int, eos_token_id: int | list[int] | None = None, cache=None, step=None,
                  check_every: int = 8) -> torch.Tensor:
    """Greedy continuations of left-padded prompts: input_ids, attention_mask (B, T) -> new tokens (B, N).

    The tokens `model.generate(do_sample=False)` gives when the generation config adds no logits processors
    (penalties and the like, which this does not apply): each row stops at its first EOS and is padded with
    `pad_token_id` after it; N <= max_new_tokens is where the last row stopped. Unlike `generate`, the host
    waits for the device only every `check_every` tokens (to see whether every row has stopped), not after each
    one: a compiled decoding step of an 8B model at batch 1 is ~7 ms of GPU work on an H100, about what the host
    needs to launch it (dynamo's guard checks, the LoRA hooks' included), so waiting every token leaves the GPU
    idle for the host's share of every step (results/speed_h100_loop.json, benchmarks/README.md).

    `cache`: a fresh KV cache, e.g. transformers' StaticCache(config, max_cache_len >= T + max_new_tokens), which
    a compiled `step` needs; None lets the model grow its own. `step`: what runs each one-token step (default the
    model; e.g. torch.compile(model.__call__, mode="reduce-overhead")); the prompt always runs on `model`. With a
    cache given, every call passes the same (B, T + max_new_tokens) mask: a compiled step sees one shape per answer.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    eos = torch.tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long, device=input_ids.device)
    eos = eos.reshape(-1)  # one id or several
    batch, length = input_ids.shape
    grows = cache is None  # the model's own cache grows with each token, and so must the mask it is given
    # transformers >= 5.24 calls the cache argument `cache` (`past_key_values` warns until 5.40 drops it)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    mask = torch.cat([attention_mask, attention_mask.new_ones(batch, max_new_tokens)], 1)  # (B, T + N)
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)  # as generate's
    out = model(input_ids=input_ids, attention_mask=mask[:, :length] if grows else mask,
                position_ids=positions, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
    cache, step, position = getattr(out, cache_kw), step or model, positions[:, -1:]  # (B, 1)
    stopped = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    tokens, all_stopped = [], []
    for i in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1).masked_fill(stopped, pad_token_id)  # (B,)
        stopped = stopped | torch.isin(token, eos)
        tokens.append(token)
        all_stopped.append(stopped.all())
        if i + 1 == max_new_tokens or (i + 1) % check_every == 0 and all_stopped[-1]:  # the only wait
            break
        position = position + 1
        torch.compiler.cudagraph_mark_step_begin()  # a CUDA-graph step may reuse the last step's output memory
        out = step(input_ids=token[:, None], attention_mask=mask[:, :length + i + 1] if grows else mask,
                   position_ids=position, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
    n = int(torch.stack(all_stopped).long().argmax()) + 1 if all_stopped[-1] else len(tokens)  # generate's N
    return torch.stack(tokens[:n], 1)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], lora, max_new_tokens: int) -> list[str]:
    """Greedy answers to left-padded prompts, each row with its own LoRA (or none)."""
    ids, mask = data.left_pad(prompts, tokenizer.pad_token_id, model.device)
    with lora_applied(model, lora) if lora is not None else nullcontext():
        out = greedy_decode(model, ids, mask, max_new_tokens, tokenizer.pad_token_id,
                            model.generation_config.eos_token_id)
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def sync(device) -> float:
    torch.cuda.synchronize() if torch.device(device).type == "cuda" else None
    return time.perf_counter()


@torch.no_grad()  # SHINE's memory pass must not keep activations for a backward (sft enables grad itself)
def run_method(method: str, records, model, tokenizer, shine, args) -> dict:
    """Answer every turn of every record; returns metrics, times and per-example predictions."""
    torch.manual_seed(args.seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    dev, preds, amortizable, generation = model.device, [], 0.0, 0.0
    contexts = other_contexts(records) if method == "shine-other" else [r.context for r in records]
    for start in tqdm(range(0, len(records), args.batch_size), desc=method, leave=False):
        batch, t0 = records[start:start + args.batch_size], sync(dev)
        lora = None
        if method in SHINE_METHODS:
            lora = shine.generate_lora(*data.left_pad([data.encode_context(tokenizer, c, args.max_context_tokens)
                                                       for c in contexts[start:start + args.batch_size]],
                                                      tokenizer.pad_token_id, dev))
        elif method == "sft":
            loras = [train_sft_lora(model, tokenizer, r, args.lora_rank, args.targets, args.sft_epochs, args.sft_lr,
                                    args.bench == "msmarco-mqa", args.system, args.seed + start + i)
                     for i, r in enumerate(batch)]
            lora = {l: {m: tuple(torch.cat([x[l][m][k] for x in loras]) for k in (0, 1)) for m in mods}
                    for l, mods in loras[0].items()}
        t1 = sync(dev)
        amortizable += (t1 - t0) if lora is not None else 0.0  # naive and in-context have nothing to prepare
        history = [[] for _ in batch]
        for turn in range(max(len(r.qa) for r in batch)):
            active = [i for i, r in enumerate(batch) if turn < len(r.qa)]
            prompts = [data.encode_prompt(tokenizer, batch[i].qa[turn][0], history[i], args.system,
                                          batch[i].context if method == "in-context" else None, args.context_in)
                       for i in active]
            replies = generate(model, tokenizer, prompts, take(lora, active) if lora else None, args.max_new_tokens)
            for i, raw in zip(active, replies):
                question, golds = batch[i].qa[turn]
                history[i].append((question, raw.strip()))  # the model's own reply is the next turn's history
                answer = clean_answer(raw)
                f1, em = score(answer, golds, args.bench in YES_NO_RULE)
                preds.append({"id": batch[i].id, "turn": turn, "question": question, "gold": golds, "raw": raw,
                              "answer": answer, "f1": f1, "em": em})
        generation += sync(dev) - t1
    per_turn = [[p["f1"] for p in preds if p["turn"] == t] for t in range(max(p["turn"] for p in preds) + 1)]
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # CPU: the process's peak RSS
    n = len(records)
    return {"f1": 100 * sum(p["f1"] for p in preds) / len(preds), "em": 100 * sum(p["em"] for p in preds) / len(preds),
            "f1_per_turn": [100 * sum(f) / len(f) for f in per_turn], "amortizable_s": amortizable / n,
            "generation_s": generation / n, "peak_memory_mb": peak / 2 ** 20, "predictions": preds}


# ----------------------------------------------------------------------------- command line
def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu, "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def default_checkpoint(model: str) -> Path | None:
    """The SHINE checkpoint shipped for the offline backbone, once it exists."""
    return DEFAULT_CKPT if model == "smollm2-135m" and (DEFAULT_CKPT / "shine_config.json").is_file() else None


def merged_results(earlier: dict, results: dict, args, n: int) -> dict:
    """`earlier` (a results JSON of this script) updated with this run's methods, after checking that both
    scored the same questions the same way: methods run apart (e.g. on two machines) then share one table."""
    same = ["bench", "data_file", "model", "seed", "max_new_tokens", "max_context_tokens", "system", "context_in"]
    if SHINE_METHODS & (set(earlier["results"]) - set(results)):  # kept SHINE results: the same checkpoint, or a
        same.append("shine_ckpt")                                   # new one replaces all of them
    differ = [k for k in same if earlier["config"].get(k) != getattr(args, k)]
    if earlier["n"] != n:
        differ.append(f"n {earlier['n']}, now {n}")
    if differ:
        raise SystemExit(f"evaluate.py --merge: {args.out} was run with other settings ({', '.join(differ)})")
    return {**earlier["results"], **results}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bench", default="hotpotqa", help=", ".join(BENCHES))
    p.add_argument("--method", default="all", help="naive, in-context, sft, shine, all, or a comma list")
    p.add_argument("--model", default="smollm2-135m", help="hub id, local directory, or smollm2-135m (offline)")
    p.add_argument("--shine-ckpt", default=None, help=f"SHINE checkpoint (smollm2-135m: {DEFAULT_CKPT.name} if any)")
    p.add_argument("--data-file", default=None, help="local file; 'hub' for the full split; default: bundled sample")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples")
    p.add_argument("--out", default=None, help="results JSON (default results/eval_<bench>_<model>.json)")
    p.add_argument("--merge", action="store_true",
                   help="keep the other methods' results already in --out (same bench, data, model, n and seed)")
    for flag, default in [("--batch-size", 8), ("--max-new-tokens", 32), ("--sft-epochs", 10), ("--seed", 0)]:
        p.add_argument(flag, type=int, default=default)
    p.add_argument("--max-context-tokens", type=int, default=None, help="cut contexts SHINE reads (paper: 1150)")
    p.add_argument("--system", default=data.SYSTEM_PROMPT, help="system prompt ('' for none)")
    p.add_argument("--context-in", default="user", choices=["user", "system"], help="where in-context puts it")
    p.add_argument("--lora-rank", type=int, default=8, help="sft LoRA rank (SHINE's checkpoint rank when given)")
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    args.methods = list(METHODS[:2]) + ["shine"] if args.method == "all" else args.method.split(",")
    if unknown := set(args.methods) - set(METHODS):
        p.error(f"unknown method {sorted(unknown)}; choose from {', '.join(METHODS)} or all")
    args.system = args.system or None
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    data.avoid_cudnn_attention()  # every context and prompt has its own length
    try:
        dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
        model, tokenizer = data.load_backbone(args.model, dtype=dtype, device=args.device)
        model.requires_grad_(False)
        tokenizer.padding_side = "left"
        records, skipped = load_bench(args.bench, args.data_file, tokenizer, args.seed)
        records = records[:args.limit]
        if not records:
            raise ValueError(f"no examples to evaluate in {args.bench}")
        ckpt = args.shine_ckpt or default_checkpoint(args.model)
        shine = load_any_checkpoint(model, ckpt).eval() if ckpt and SHINE_METHODS & set(args.methods) else None
    except (ValueError, OSError, RuntimeError) as error:  # unknown bench, missing file, mismatched checkpoint, ...
        raise SystemExit(f"evaluate.py: {error}") from error
    if shine is not None:
        args.lora_rank = shine.config.lora_rank
    args.targets = shine.config.target_modules if shine is not None else LLAMA_LINEARS  # sft's linears
    if SHINE_METHODS & set(args.methods) and shine is None:
        print("shine needs --shine-ckpt DIR (no trained SHINE checkpoint found); running the baselines only")
        args.methods = [m for m in args.methods if m not in SHINE_METHODS] or ["naive", "in-context"]
    if "sft" in args.methods and args.bench == "msmarco-mqa":
        print("note: sft on msmarco-mqa trains on the QA pairs it is asked (an upper bound; see evaluate.py)")
    results = {m: run_method(m, records, model, tokenizer, shine, args) | {"machine": machine()}
               for m in args.methods}  # each method's own machine: --merge may join runs from several
    print(f"\n{args.bench}: n={len(records)} (skipped {skipped}), backbone {args.model}, checkpoint {ckpt}")
    print(f"{'method':<12}{'F1':>7}{'EM':>7}{'amortizable s':>15}{'generation s':>14}{'peak MB':>9}")
    for m, r in results.items():
        print(f"{m:<12}{r['f1']:7.1f}{r['em']:7.1f}{r['amortizable_s']:15.3f}{r['generation_s']:14.3f}"
              f"{r['peak_memory_mb']:9.0f}" + (f"  F1 per turn {[round(f, 1) for f in r['f1_per_turn']]}"
                                                if args.bench == "msmarco-mqa" else ""))
    out = Path(args.out or ROOT / "results" / f"eval_{args.bench}_{Path(args.model).name}.json")
    if args.merge and out.exists():
        results = merged_results(json.loads(out.read_text()), results, args, len(records))
        args.methods = list(results)
    report = {"config": vars(args), "backbone": {"name": args.model, "class": type(model).__name__,
                                                 "parameters": sum(p.numel() for p in model.parameters())},
              "checkpoint": str(ckpt) if ckpt else None, "shine_config": shine and asdict(shine.config),
              "bench": args.bench, "n": len(records), "skipped": skipped, "machine": machine(), "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
