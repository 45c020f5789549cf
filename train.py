"""Train SHINE's hypernetwork: pretraining, then instruction fine-tuning on multi-QA, then on single-QA (section 4).

    python train.py --stage pretrain                                   # one GPU (or the CPU)
    torchrun --nproc_per_node=8 train.py --stage pretrain              # DDP
    torchrun --nproc_per_node=2 train.py --stage pretrain --fsdp       # FSDP2: the hypernetwork is sharded
    torchrun --nproc_per_node=8 train.py --stage pretrain --fsdp --fsdp-llm   # and the frozen LLM too
    python train.py --stage ift-mqa --init-from runs/pretrain          # each stage starts from the previous one
    python train.py --stage ift-1qa --init-from runs/ift-mqa
    python train.py --stage pretrain --compile inductor                # layers compiled: fused kernels (GPU)
    python train.py --stage pretrain --preset smollm2 --max-steps 20   # offline smoke run on bundled data

Defaults are the paper's (sections 5.1-5.2, Qwen3-8B, AdamW with weight decay 0.01, linear schedule with warmup,
clipping 1.0, peak lr 5e-5 / 3e-5 / 1e-5 for 1 / 2 / 1 epochs, contexts of at most 1,150 tokens). `-h` lists them.

Pretraining (4.1, B.1): texts are packed up to --max-context tokens, separated by an end-of-text token; each text
is a reconstruction or (with probability 1 - lambda) a completion task, whose context loses its last k ~ U(0.1N,
0.3N) tokens; the answer is a chat of "<RECON>" / "<COMP>" user turns, each followed by one full text as the
assistant turn, in random order. The markers are plain text: the embeddings are frozen, so new tokens would keep
random embedding rows forever and tie checkpoints to a resized vocabulary; plain-text markers need neither, and
the hypernetwork learns what they mean all the same. Loss on assistant tokens only (data.encode_chat).
"""
import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import flops
from shine import Shine, ShineConfig, decoder_layers

RECON, COMP = "<RECON>", "<COMP>"


@dataclass
class TrainConfig:
    stage: str = "pretrain"  # pretrain | ift-mqa | ift-1qa
    preset: str = ""  # "smollm2": the bundled backbone and real text, runs offline anywhere
    model: str = "Qwen/Qwen3-8B"
    data: str = ""  # comma-separated hub names or local files; "" = the stage's default
    val_data: str = ""  # held-out texts (pretrain: Figure 5's WikiText-2) or QA; "" = hold out from --data
    out_dir: str = ""  # "" = runs/<stage>
    init_from: str = ""  # the previous stage: its out_dir (its latest checkpoint) or one step_N checkpoint
    resume: bool = False  # continue from out_dir's latest checkpoint
    lora_rank: int = 8  # r
    meta_lora_rank: int = 128
    m2p_layers: int = 4
    lora_scale: float = 1e-3  # s of the generated update (shine.ShineConfig); the paper's value, for H = 4096
    memory_norm: str = "none"  # how the M2P reads the memory states (shine.MEMORY_NORMS); "none" as the paper
    lr: float = 5e-5
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    batch_size: int = 1  # sequences per device per micro-step
    grad_accum: int = 8
    max_context: int = 1150
    max_answer: int = 1400  # tokens of the answering chat; longer IFT conversations lose their last turns
    recon_prob: float = 0.5  # lambda (4.1)
    val_size: int = 32
    eval_every: int = 200
    save_every: int = 500
    fsdp: bool = False  # shard the hypernetwork (weights, gradients, AdamW moments); the frozen LLM is replicated
    fsdp_llm: bool = False  # with --fsdp: shard the frozen LLM's decoder layers too, for backbones one GPU can't hold
    activation_checkpointing: bool = False
    compile: str = ""  # a torch.compile backend ("inductor"): Shine.compile_layers fuses the layers' small kernels
    cudnn_attention: bool = False  # let SDPA pick cuDNN: slower here, it plans per new length (data.py)
    seed: int = 42
    attn: str = ""  # the backbone's attention implementation ("eager", "sdpa", ...); "" = transformers' default
    peak_tflops: float = 989.0  # the GPU's dense bf16 peak, for the log's MFU (H100 SXM: 989; PCIe: 756)


STAGES = {  # the paper's per-stage settings (5.1-5.2) and data (the authors' hub collections)
    "pretrain": dict(lr=5e-5, epochs=1.0, data="fxmeng/transmla_pretrain_6B_tokens",
                     val_data=str(data.BUNDLED["wikitext-2"])),  # the whole WikiText-2 test set ships with us
    "ift-mqa": dict(lr=3e-5, epochs=2.0, data="Yewei-Liu/ift_mqa_collection"),
    "ift-1qa": dict(lr=1e-5, epochs=1.0, data="Yewei-Liu/ift_1qa_collection"),
}
_B = data.BUNDLED
_SHIFTS = ",".join(str(_B[f"squadshifts-{d}"]) for d in ("new_wiki", "nyt", "reddit", "amazon"))
PRESETS = {"smollm2": {  # SmolLM2-135M-Instruct: Meta-LoRA rank 40 keeps the checkpoint under 48 MB in bf16
    # s * sqrt(r * I) sets the fresh update's size relative to the input (shine.py). s = 1e-3 * sqrt(4096 / 576) =
    # 2.7e-3 would give H = 576 the paper's relative start, but that random start is noise the hypernetwork first
    # learns to silence: with it the context barely reaches the LoRA in minutes of training; 2.7e-4 carries ~4x
    # more (benchmarks/channel_probe.py, results/shine-135m/channel_probe.json), as the shipped checkpoint uses.
    # memory_norm "rms": raw memory states carry context-independent massive activations; normalized, the channel
    # was 2.5x larger after 400 steps of the same probe, and the retrained checkpoint answers SQuAD better (README).
    "all": dict(model=data.SMOLLM2_ALIAS, meta_lora_rank=40, lora_scale=2.7e-4, memory_norm="rms",
                max_context=1150, max_answer=1400, grad_accum=1, batch_size=4, eval_every=50, save_every=100),
    "pretrain": dict(data=f"{_SHIFTS},{_B['coqa']}", lr=3e-4),
    "ift-mqa": dict(data=f"{_B['coqa']},{_SHIFTS}", lr=2e-4),
    "ift-1qa": dict(data=_SHIFTS, lr=1e-4),
}}


def parse_args(argv=None) -> TrainConfig:
    """CLI from the dataclass: flags override the preset, which overrides the stage, which overrides defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action="store_true", default=None, help=f"(default {f.default})")
        else:
            parser.add_argument(flag, type=f.type, default=None, help=f"(default {f.default!r})")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    stage, preset = given.get("stage", "pretrain"), given.get("preset", "")
    if stage not in STAGES:
        parser.error(f"--stage must be one of {list(STAGES)}")
    if preset and preset not in PRESETS:
        parser.error(f"--preset must be one of {list(PRESETS)}")
    p = PRESETS.get(preset, {})
    cfg = TrainConfig(**{**STAGES[stage], **p.get("all", {}), **p.get(stage, {}), **given})
    cfg.out_dir = cfg.out_dir or f"runs/{stage}"
    return cfg


# ----------------------------------------------------------------------------- data
def eot_id(tokenizer) -> int:
    """The end-of-text separator between packed texts (B.1): <|endoftext|> where the vocabulary has it."""
    tid = tokenizer.convert_tokens_to_ids("<|endoftext|>")  # may be the unknown token's id when it is missing...
    known = isinstance(tid, int) and tokenizer.convert_ids_to_tokens(tid) == "<|endoftext|>"  # ...or be it (SmolLM2)
    return tid if known else tokenizer.eos_token_id


def pack(lengths: list[int], max_len: int) -> list[list[int]]:
    """Greedy packing (B.1): consecutive texts while their lengths plus one separator each fit in max_len."""
    groups, size = [], max_len + 1
    for i, n in enumerate(lengths):
        if size + 1 + n > max_len:
            groups.append([])
            size = -1
        groups[-1].append(i)
        size += 1 + n
    return groups


def pretrain_example(tokenizer, texts: list[list[int]], rng: random.Random, eot: int, recon_prob: float) -> dict:
    """One packed pretraining example: context ids and the answering chat with labels on the texts (B.1)."""
    tasks = [RECON if rng.random() < recon_prob else COMP for _ in texts]
    context = []
    for ids, task in zip(texts, tasks):
        n = len(ids)
        cut = min(n - 1, max(1, round(rng.uniform(0.1, 0.3) * n))) if task == COMP else 0  # k ~ U(0.1N, 0.3N)
        context += ids[:n - cut] + [eot]
    order = rng.sample(range(len(texts)), len(texts))  # random permutation of the answers (B.1)
    input_ids, labels = data.encode_chat(tokenizer, [(tasks[i], tokenizer.decode(texts[i])) for i in order])
    return {"context": context[:-1], "input_ids": input_ids, "labels": labels, "tasks": tasks, "order": order}


def pretrain_examples(tokenizer, texts: list[str], cfg: TrainConfig, seed: int, show: bool = True) -> list[dict]:
    ids = [data.encode_context(tokenizer, t) for t in tqdm(texts, "tokenizing", disable=not show)]
    chunks = [x[i:i + cfg.max_context] for x in ids for i in range(0, len(x), cfg.max_context) if len(x) > 1]
    rng, eot = random.Random(seed), eot_id(tokenizer)
    return [pretrain_example(tokenizer, [chunks[i] for i in group], rng, eot, cfg.recon_prob)
            for group in tqdm(pack([len(c) for c in chunks], cfg.max_context), "packing", disable=not show)]


def ift_examples(tokenizer, records: list[data.QARecord], cfg: TrainConfig, show: bool = True) -> tuple[list, int]:
    """(context, QA chat) examples (4.2); a conversation too long for max_answer loses its last turns."""
    examples, skipped = [], 0
    for rec in tqdm(records, "encoding", disable=not show):
        context = data.encode_context(tokenizer, rec.context, cfg.max_context)  # as evaluate.py reads contexts
        turns = [(q, answers[0]) for q, answers in rec.qa]
        while turns:
            input_ids, labels = data.encode_chat(tokenizer, turns, system=data.SYSTEM_PROMPT)
            if len(input_ids) <= cfg.max_answer:
                examples.append({"context": context, "input_ids": input_ids, "labels": labels})
                break
            turns = turns[:-1]
        skipped += not turns
    return examples, skipped


def build_examples(tokenizer, sources: str, cfg: TrainConfig, seed: int, show: bool, limit: int | None = None):
    """Examples of the stage from comma-separated sources; `limit` keeps the first texts or records only."""
    if cfg.stage == "pretrain":
        texts = [t for s in sources.split(",") for t in data.load_texts(s)][:limit]
        return pretrain_examples(tokenizer, texts, cfg, seed, show)
    mode = "mqa" if cfg.stage == "ift-mqa" else "1qa"
    records = [r for s in sources.split(",") for r in data.load_qa(s, mode=mode)[0]][:limit]
    examples, skipped = ift_examples(tokenizer, records, cfg, show)
    if skipped and show:
        print(f"skipped {skipped} records longer than --max-answer {cfg.max_answer} even with one turn")
    return examples


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Contexts left-padded (memory tokens follow them, see shine.py); answering chats right-padded."""
    def right_padded(rows, value):
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows])
    context_ids, context_mask = data.left_pad([e["context"] for e in examples], pad_id)
    ids = [e["input_ids"] for e in examples]
    return {"context_ids": context_ids, "context_mask": context_mask, "input_ids": right_padded(ids, pad_id),
            "attention_mask": right_padded([[1] * len(i) for i in ids], 0),
            "labels": right_padded([e["labels"] for e in examples], -100)}


# ----------------------------------------------------------------------------- optimisation
def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup to `peak`, then linear decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def make_optimizer(shine: Shine, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only: no decay on biases, norms and embeddings."""
    no_decay = lambda n, p: p.dim() < 2 or "norm" in n or n in ("memory", "m2p.layer_embedding", "m2p.token_embedding")
    params = [(n, p) for n, p in shine.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if not no_decay(n, p)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0}]
    # fused: one kernel per step on the GPU; the multi-kernel default took ~20% of an 8B-shape step on an H100
    fused = all(p.is_cuda for _, p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=fused)


def step_flops(shape: flops.Shape, micro_batches: list[dict], cfg: TrainConfig) -> float:
    """Model FLOPs of this process's share of one step (flops.py, backward = 2 x forward), real tokens only:
    the memory pass with the Meta-LoRA and the M2P per context, the answer pass with the LoRA and the LM head on
    the labelled positions. Padding is work the GPU does but the model does not need, so it does not count."""
    total = 0
    for b in micro_batches:
        rows = zip(b["context_mask"].sum(1).tolist(), b["attention_mask"].sum(1).tolist(),
                   (b["labels"][:, 1:] != -100).sum(1).tolist())  # shifted, as Shine.answer_loss reads them
        for context, answer, labelled in rows:
            total += flops.shine_flops(shape, context, cfg.lora_rank, cfg.m2p_layers, cfg.meta_lora_rank)["total"]
            total += flops.llm_flops(shape, answer, logits=labelled, lora_rank=cfg.lora_rank)["total"]
    return 3 * total


def loss_of_step(model, micro_batches: list[dict], world: int, autocast) -> float:
    """One optimiser step's forward/backward: the mean over every answer token of the global batch."""
    count = torch.tensor(float(sum((b["labels"][:, 1:] != -100).sum() for b in micro_batches)))
    total = torch.zeros(())
    if world > 1:
        dist.all_reduce(count := count.to(micro_batches[0]["labels"].device))
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: communicate once per step, not per micro-batch
            model.set_requires_gradient_sync(last)  # no reduce-scatter until the last one
            model.set_reshard_after_backward(last)  # and no all-gather after the first: keep the gathered weights
        with sync, autocast():
            loss_sum = model(**batch, reduction="sum")
            (loss_sum * world / count).backward()  # DDP/FSDP average over ranks: this makes it the global mean
        total = total + loss_sum.detach().float().cpu()
    if world > 1:
        dist.all_reduce(total := total.to(count.device))
    return (total / count).item()


def optimizer_step(shine: Shine, model, optimizer, micro_batches: list[dict], lr: float, cfg: TrainConfig,
                   world: int, autocast) -> float:
    """One AdamW step at learning rate `lr` over the micro-batches (gradient accumulation); returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = loss_of_step(model, micro_batches, world, autocast)
    norm = torch.nn.utils.clip_grad_norm_([p for p in shine.parameters() if p.requires_grad], cfg.grad_clip)
    if math.isfinite(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)):
        optimizer.step()
    else:  # one inf/NaN gradient would turn every weight into NaN through AdamW: skip the step, say so
        print(f"skipped an optimizer step: gradient norm {float(norm)}")
    optimizer.zero_grad(set_to_none=True)
    return loss


@torch.no_grad()
def mean_loss(model, examples: list[dict], batch_size: int, pad_id: int, device, autocast) -> float:
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        with autocast():
            total += model(**batch, reduction="sum").float().item()
        count += int((batch["labels"][:, 1:] != -100).sum())
    return total / count


# ----------------------------------------------------------------------------- checkpoints
def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from FSDP shards (a collective: every rank must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _shard_like(like: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like` is on this rank (a DTensor shard under FSDP)."""
    full = full.to(like.device, like.dtype)
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(full, like.device_mesh, like.placements)
    return full


def save_checkpoint(shine: Shine, optimizer, cfg: TrainConfig, step: int, rank: int) -> None:
    """out_dir/step_N/: hypernetwork.safetensors + shine_config.json (loadable by Shine.from_pretrained), the AdamW
    moments as optimizer.safetensors, and the trainer state. Everything is safetensors or JSON (no pickle). Written
    under a temporary name and renamed, so a kill never leaves a half-written checkpoint behind 'latest'."""
    from safetensors.torch import save_file

    params = shine.hypernetwork_state_dict()
    state = {n: _full(p) for n, p in params.items()}
    moments = {f"{n}.{k}": _full(v) for n, p in params.items() for k, v in optimizer.state.get(p, {}).items()}
    if rank != 0:
        return
    out = Path(cfg.out_dir)
    final, tmp = out / f"step_{step:07d}", out / f".tmp_step_{step:07d}"
    shine.save_hypernetwork(tmp, state)
    save_file({k: v.detach().cpu().contiguous() for k, v in moments.items()}, tmp / "optimizer.safetensors")
    # the data position is the step: each epoch's order is a seeded permutation, so nothing else is needed
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    (tmp / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    os.replace(tmp, final)
    (out / "latest.tmp").write_text(final.name)
    os.replace(out / "latest.tmp", out / "latest")  # a file naming the newest complete checkpoint


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory (its `latest` pointer), None where there is none."""
    pointer = Path(out_dir) / "latest"
    return Path(out_dir) / pointer.read_text().strip() if pointer.is_file() else None


@torch.no_grad()
def load_checkpoint(shine: Shine, optimizer, directory: Path) -> int:
    """Restore weights and AdamW moments from `directory` (into FSDP shards too); returns the step."""
    from safetensors.torch import load_file

    weights, moments = load_file(directory / "hypernetwork.safetensors"), load_file(directory / "optimizer.safetensors")
    for name, p in shine.hypernetwork_state_dict().items():
        p.copy_(_shard_like(p, weights[name]))
        mine = {k.rsplit(".", 1)[1]: v for k, v in moments.items() if k.rsplit(".", 1)[0] == name}
        optimizer.state[p] = {k: _shard_like(p, v) if v.dim() else v for k, v in mine.items()}  # "step" stays a scalar
    return json.loads((directory / "trainer_state.json").read_text())["step"]


# ----------------------------------------------------------------------------- main
def setup_distributed() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def build_model(cfg: TrainConfig, device: torch.device, world: int):
    """The backbone (bf16 on GPU) and SHINE, wrapped for DDP or FSDP2.

    FSDP2 shards what has optimizer state: the hypernetwork (one group per M2P block, the rest at the root). The
    frozen LLM has no gradients or moments, so by default every GPU keeps a whole bf16 copy: sharding it means
    all-gathering every layer for the memory pass and again for the answer pass, forward and backward (at the
    Qwen3-8B shape on two H100s, 1,052 instead of 784 ms per micro-step). `fsdp_llm` shards its decoder layers as
    well, for backbones a GPU cannot hold beside the activations.
    """
    cuda = device.type == "cuda"
    if cfg.fsdp_llm and not cfg.fsdp:
        raise SystemExit("--fsdp-llm shards the LLM under FSDP: add --fsdp")
    if cfg.fsdp_llm and cfg.memory_norm == "backbone":
        raise SystemExit("--memory-norm backbone reads the LLM's norm weights outside its layers, which --fsdp-llm "
                         "shards: use --memory-norm rms")
    try:
        attn = {"attn_implementation": cfg.attn} if cfg.attn else {}
        dtype = torch.bfloat16 if cuda else torch.float32
        llm, tokenizer = data.load_backbone(cfg.model, dtype, device, **attn)  # a config-only dir: built there
    except OSError as error:
        raise SystemExit(f"{error}\nOffline? `--preset smollm2` trains on a bundled model and bundled real text.")
    shine_config = ShineConfig(lora_rank=cfg.lora_rank, meta_lora_rank=cfg.meta_lora_rank, m2p_layers=cfg.m2p_layers,
                               lora_scale=cfg.lora_scale, memory_norm=cfg.memory_norm)
    init = latest_checkpoint(cfg.init_from) or cfg.init_from if cfg.init_from else None
    shine = Shine.from_pretrained(llm, init) if init else Shine(llm, shine_config)
    shine.to(device)
    if cfg.compile:
        shine.compile_layers(backend=cfg.compile)
    if cfg.activation_checkpointing:
        shine.enable_activation_checkpointing()
    model = shine
    if cfg.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 compute, fp32 master weights and gradient reduction; the frozen bf16 LLM needs no cast
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None, reduce_dtype=torch.float32)
        for block in shine.m2p.blocks:
            fully_shard(block, mp_policy=policy)
        if cfg.fsdp_llm:
            for layer in decoder_layers(llm):
                fully_shard(layer, mp_policy=policy)
        # the root: memory embeddings, Meta-LoRA, positional embeddings (and with fsdp_llm the LLM's embeddings,
        # final norm and LM head)
        fully_shard(shine, mp_policy=policy, ignored_params=None if cfg.fsdp_llm else set(llm.parameters()))
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(shine, device_ids=[device.index] if cuda else None)
    return shine, model, tokenizer


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    rank, world, device = setup_distributed()
    master = rank == 0
    if not cfg.cudnn_attention:
        data.avoid_cudnn_attention()
    torch.manual_seed(cfg.seed)  # the same init on every rank: FSDP, unlike DDP, broadcasts nothing
    shine, model, tokenizer = build_model(cfg, device, world)
    torch.manual_seed(cfg.seed + rank)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = build_examples(tokenizer, cfg.data, cfg, cfg.seed, master)
    if cfg.val_data:
        # pretraining: Figure 5's two quantities, reconstruction and completion, on held-out texts
        tasks = {"recon": 1.0, "comp": 0.0} if cfg.stage == "pretrain" else {"val": cfg.recon_prob}
        val = {name: build_examples(tokenizer, cfg.val_data, TrainConfig(**{**asdict(cfg), "recon_prob": p}),
                                    cfg.seed, False, cfg.val_size)[:cfg.val_size] for name, p in tasks.items()}
    else:
        val, examples = {"val": examples[:cfg.val_size]}, examples[cfg.val_size:]
    if not examples:
        held_out = "" if cfg.val_data else f" once {cfg.val_size} were held out for validation (--val-size)"
        raise SystemExit(f"no training examples from {cfg.data}{held_out}: check the data and the tokenizer")
    global_batch = cfg.batch_size * cfg.grad_accum * world
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * len(examples) / global_batch)
    if master:
        print(f"{len(examples)} examples, {total} steps of {global_batch}, {shine.parameter_report()}")
    optimizer = make_optimizer(shine, cfg)
    step = 0
    if cfg.resume and latest_checkpoint(cfg.out_dir):
        step = load_checkpoint(shine, optimizer, latest_checkpoint(cfg.out_dir))
    cuda = device.type == "cuda"
    shape = flops.Shape.from_config(shine.llm.config)
    # FSDP casts the hypernetwork to bf16 as it gathers it; otherwise autocast runs the fp32 hypernetwork in bf16
    autocast = lambda: torch.autocast("cuda", torch.bfloat16) if cuda and not cfg.fsdp else nullcontext()
    permutations = {}  # epoch -> order; the data position is just the step, so resuming replays nothing
    order = lambda e: permutations.setdefault(
        e, torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed + e)))
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    log, record = Path(cfg.out_dir) / "log.jsonl", {}
    model.train()
    while step < total:
        t0 = time.perf_counter()
        positions = [step * global_batch + k for k in range(global_batch)]
        mine = positions[rank * cfg.batch_size * cfg.grad_accum:(rank + 1) * cfg.batch_size * cfg.grad_accum]
        picked = [examples[order(p // len(examples))[p % len(examples)]] for p in mine]
        micro = [{k: v.to(device) for k, v in collate(picked[i:i + cfg.batch_size], pad_id).items()}
                 for i in range(0, len(picked), cfg.batch_size)]
        lr = lr_at(step, total, int(cfg.warmup_ratio * total), cfg.lr)
        loss = optimizer_step(shine, model, optimizer, micro, lr, cfg, world, autocast)
        step += 1
        if cuda:
            torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - t0)
        tokens = world * sum(b["context_mask"].sum().item() + b["attention_mask"].sum().item() for b in micro)
        record = {"step": step, "loss": loss, "lr": lr, "ms": ms, "tok_s": tokens / ms * 1e3}
        if cuda:  # per GPU: this rank's model FLOPs and memory
            tflops = step_flops(shape, micro, cfg) / ms / 1e9
            record |= {"gpus": world, "tflops": tflops, "mfu": tflops / cfg.peak_tflops,
                       "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                       # > 0: the caching allocator ran out, freed its cache and synchronised (fragmentation from
                       # varying lengths); PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True avoids it
                       "alloc_retries": torch.cuda.memory_stats(device)["num_alloc_retries"]}
        if step % cfg.eval_every == 0 or step == total:
            model.eval()
            for name, val_examples in val.items():
                record[f"val_{name}_loss"] = mean_loss(model, val_examples, cfg.batch_size, pad_id, device, autocast)
                record[f"val_{name}_ppl"] = math.exp(min(record[f"val_{name}_loss"], 50))
            model.train()
        if master:
            print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            with log.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if step % cfg.save_every == 0 or step == total:
            save_checkpoint(shine, optimizer, cfg, step, rank)
    if world > 1:
        dist.barrier()  # rank 0 may still be writing the last checkpoint: tearing gloo down under it aborted a rank
        dist.destroy_process_group()
    return record


if __name__ == "__main__":
    main()
    if "RANK" in os.environ:
        # A torchrun worker leaves without finalizing the interpreter. destroy_process_group does not stop gloo's
        # worker and TCP threads: they end only with the last reference to the group, and on torch 2.13 torch keeps
        # some past it (FSDP2's DeviceMesh sits in DTensor's global caches; DDP and plain all-reduces leave one
        # too), so no teardown here reliably joins them. Finalizing with them running aborts a process
        # (pytorch/pytorch#179291): the likely cause of rank 1's rare SIGABRT, "terminate called without an active
        # exception", after its run had finished.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
