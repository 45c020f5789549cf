"""FLOPs, peak memory and parameter counts of SHINE against SFT, in-context and naive (App. B.5, B.6, C.2).

    python flops.py --model qwen3-8b --context 1150 --question 200   # side by side + M2P saving table
    python flops.py --model qwen3-8b --sweep context                 # the Figure 7 series
    python flops.py --model path/to/config.json --paper              # any Llama/Qwen config; paper accounting

Conventions (App. B.5): 1 MAC = 2 FLOPs; only matmuls count (norms, softmax, RoPE rotations, activations,
residual and bias adds are left out, as `torch.utils.flop_counter.FlopCounterMode` leaves them out; on CPU run
it under `sdpa_kernel(SDPBackend.MATH)`, the CPU flash kernel counts 0); attention costs 4*N_q*N_k*d per head
(QK^T and AV, the full matrix even when causal); backward = 2x forward, so a training step = 3x forward;
memory in scalars, 2 bytes each in bf16. tests/test_flops.py matches FlopCounterMode on the real modules to the
FLOP, once Hugging Face's RoPE-table matmul (d*T FLOPs a forward) is added.
Every function returns named terms (`out["llm/mlp"]`, `out["m2p/attn"]`, ...) and `out["total"]`.

Paper versus ours. On Qwen3-8B's shape (K/V width H/4, MLP 3H) `llm_flops` is eqs. 19-27 exactly;
`shine_flops(meta_rank=0, m2p_mlp="swiglu", full_last_mlp=True)` is eqs. 30-32 and `sft_flops(rank=0)` eq. 35.
Our defaults count what our model computes: the Meta-LoRA (2R(in+out) per token and linear, `meta_lora`), an M2P
with a plain GELU MLP of width 2H (8NH^2, not eq. 29's SwiGLU 12NH^2; packed qkv, whose biases are adds), no
last-layer MLP at the C context rows (nothing reads them: -6CHI, 1.8% of eq. 30 at C = 1150), and
`lora/unmerged` (2r(in+out) per token and linear) when the generated LoRA runs as hooks instead of merged.
Eq. 32 as printed ends in 2LM^2; eqs. 30 + 31 give 2L'M^2 (a typo, +0.8% at C = 1150; we follow 30-31).

Section 3.4's "up to 90%" (`m2p_saving`): alternating column/row attention over the (L, M) grid against full
attention over L*M tokens. At the paper's default (r = 8, M = 148, L = 36, L' = 4, H = 4096) the attention
matmuls alone save 1 - (L+M)/(2LM) = 98.3% (over 90% for every r at L = 36), but the whole M2P saves 24.1%
(ours) or 20.3% (paper's SwiGLU): projections and MLP (16 LMH^2 a block, 20 in the paper) cost the same either
way and dominate. The whole M2P saves 90% only from r = 258 (ours, M = 4773) or r = 322 (paper). So the 90%
holds for the attention matmuls, not for the M2P's FLOPs at any rank the paper uses.
"""
import argparse
import json
import math
from dataclasses import dataclass

GiB = 2**30
BF16 = 2  # bytes per scalar
METHODS = ("shine", "sft", "in-context", "naive")


@dataclass(frozen=True)
class Shape:
    """Backbone shape: the Llama/Qwen decoder the formulas need (GQA attention, SwiGLU MLP)."""
    layers: int        # L
    hidden: int        # H
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # SwiGLU width (3H in the paper)
    vocab: int         # V
    tied: bool = False
    qk_norm: bool = False  # Qwen3's per-head RMSNorm on q and k (parameters only)

    @classmethod
    def from_config(cls, cfg) -> "Shape":
        cfg = cfg.get_text_config()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, kv, head_dim,
                   cfg.intermediate_size, cfg.vocab_size, bool(getattr(cfg, "tie_word_embeddings", False)),
                   cfg.model_type.startswith("qwen3"))

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear of one decoder layer, like `shine.lora_shapes`."""
        H, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
                "gate_proj": (H, i), "up_proj": (H, i), "down_proj": (i, H)}

    @property
    def D(self) -> int:  # sum of in + out over a layer's linears (section 3.3)
        return sum(i + o for i, o in self.linears().values())

    def params(self) -> int:
        """LLM parameters (P of eq. 45): bias-free linears, RMSNorms, embeddings."""
        per_layer = sum(i * o for i, o in self.linears().values()) + 2 * self.hidden + 2 * self.head_dim * self.qk_norm
        return self.layers * per_layer + self.hidden + self.vocab * self.hidden * (1 if self.tied else 2)


PRESETS = {"qwen3-8b": Shape(36, 4096, 32, 8, 128, 12288, 151_936, tied=False, qk_norm=True)}
CONTEXTS = (128, 256, 512, 1024, 1150, 2048, 4096, 8192)  # the --sweep context series (Figure 7)


def memory_tokens(s: Shape, rank: int) -> int:
    return -(-rank * s.D // s.hidden)  # M = ceil(r*D/H), eq. 4


def _total(out: dict) -> dict:
    out["total"] = sum(v for k, v in out.items() if k != "total")
    return out


def llm_flops(s: Shape, tokens: int, keys: int | None = None, logits: int = 1, lora_rank: int = 0) -> dict:
    """Forward of `tokens` new tokens attending to `keys` keys (default: themselves, eq. 20; a KV-cache step
    is tokens=1, keys=N, eq. 25), the LM head on `logits` positions (eq. 21), optional unmerged LoRA."""
    keys = tokens if keys is None else keys
    L, H, q, kv = s.layers, s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    out = {"llm/attn_proj": L * 2 * tokens * H * (2 * q + 2 * kv),  # eq. 19: q, o + k, v
           "llm/attn": L * 4 * tokens * keys * q,                    # QK^T and AV over query heads
           "llm/mlp": L * 3 * 2 * tokens * H * s.intermediate,      # gate, up, down
           "llm/vocab": 2 * logits * H * s.vocab}
    if lora_rank:
        out["llm/lora"] = L * 2 * tokens * lora_rank * s.D  # x A then (x A) B, for each linear
    return _total(out)


def m2p_flops(L: int, M: int, H: int, layers: int = 4, mlp: str = "gelu", attention: str = "rowcol",
              mlp_ratio: float = 2.0, first: str = "column") -> dict:
    """M2P over an (L, M, H) grid: column attention (M sequences of L) on odd blocks, row (L of M) on even
    ones (eqs. 7-8), or full attention over L*M tokens. `mlp="swiglu"` is the paper's eq. 29 (12NH^2)."""
    n, width = L * M, int(mlp_ratio * H)
    columns = math.ceil(layers / 2) if first == "column" else layers // 2  # eq. 31: half each for even L'
    if attention == "full":
        attn = layers * 4 * n * n * H
    else:
        attn = 4 * H * (columns * M * L * L + (layers - columns) * L * M * M)
    return _total({"m2p/attn_proj": layers * 8 * n * H * H,  # q, k, v, o at width H (eq. 28)
                   "m2p/attn": attn,
                   "m2p/mlp": layers * (3 if mlp == "swiglu" else 2) * 2 * n * H * width})


def shine_flops(s: Shape, context: int, rank: int = 8, m2p_layers: int = 4, meta_rank: int = 128,
                m2p_mlp: str = "gelu", full_last_mlp: bool = False) -> dict:
    """Amortizable FLOPs of SHINE (eq. 32): memory extraction over C+M tokens without LM head (eq. 30),
    plus Meta-LoRA, plus the M2P (eq. 31). Parameter generation is a reshape: no FLOPs. Like the LM head, the
    last layer's MLP (and its Meta-LoRA) runs on the M memory rows only, as nothing reads its context rows;
    `full_last_mlp` counts it over all C + M rows, as eq. 30 does."""
    M = memory_tokens(s, rank)
    out = llm_flops(s, context + M, logits=0, lora_rank=meta_rank)
    out.pop("total"), out.pop("llm/vocab")
    if not full_last_mlp:
        out["llm/mlp"] -= 3 * 2 * context * s.hidden * s.intermediate
        if meta_rank:
            out["llm/lora"] -= 2 * context * meta_rank * 3 * (s.hidden + s.intermediate)
    if meta_rank:
        out["meta_lora"] = out.pop("llm/lora")
    m2p = m2p_flops(s.layers, M, s.hidden, m2p_layers, m2p_mlp)
    return _total(out | {k: v for k, v in m2p.items() if k != "total"})


def sft_flops(s: Shape, context: int, steps: int = 50, rank: int = 0) -> dict:
    """Eq. 35: `steps` training steps on C tokens, LM head on every position, backward = 2x forward.
    T = 50: Table 1's SFT runs 10 epochs over 5 conversations per context, one conversation a step. The 3x is
    exact for full fine-tuning (measured); a LoRA on a frozen base skips weight gradients (measured ~2.1x)."""
    return _total({k: 3 * steps * v for k, v in llm_flops(s, context, logits=context, lora_rank=rank).items()
                   if k != "total"})


def generation_flops(s: Shape, method: str, question: int, context: int, kv_cache: bool, rank: int = 8,
                     merged: bool = True) -> dict:
    """FLOPs for one new token (eqs. 36-39) after I question tokens (+ C context tokens for in-context):
    a full forward without KV cache, one cached decoding step with it."""
    n = question + context if method == "in-context" else question
    lora = rank if method in ("shine", "sft") and not merged else 0
    out = llm_flops(s, 1, keys=n, lora_rank=lora) if kv_cache else llm_flops(s, n, lora_rank=lora)
    if lora:
        out["lora/unmerged"] = out.pop("llm/lora")
    return out


def peak_memory(s: Shape, method: str, question: int, context: int, kv_cache: bool,
                attention: str = "efficient") -> dict:
    """Peak extra memory in scalars beyond the weights (App. B.6). Without KV cache: hidden states and MLP
    intermediates of every layer (eq. 41, 4LNH), plus one N x N matrix a layer for standard attention (eq. 42;
    eager attention really holds heads x N x N). With KV cache: keys and values of all layers (eqs. 43-44)."""
    n = question + context if method == "in-context" else question
    if kv_cache:
        return _total({"kv_cache": s.layers * 2 * n * s.kv_heads * s.head_dim})
    out = {"activations": s.layers * n * (s.hidden + s.intermediate)}
    if attention == "standard":
        out["attn_scores"] = s.layers * n * n
    return _total(out)


def hypernetwork_params(s: Shape, rank: int = 8, meta_rank: int = 128, m2p_layers: int = 4,
                        mlp_ratio: float = 2.0) -> dict:
    """Exact trainable parameters of our `shine.Shine`: Meta-LoRA on every linear of every layer, M2P blocks
    (packed qkv and out projections with biases, 2-layer MLP with biases, two LayerNorms), positional
    embeddings P^layer, P^token (eq. 5) and the M memory embeddings."""
    M, H, W = memory_tokens(s, rank), s.hidden, int(mlp_ratio * s.hidden)
    block = (3 * H * H + 3 * H) + (H * H + H) + (H * W + W) + (W * H + H) + 2 * 2 * H
    return _total({"meta_lora": s.layers * meta_rank * s.D, "m2p/blocks": m2p_layers * block,
                   "m2p/positions": (s.layers + M) * H, "memory": M * H})


def paper_params(s: Shape, meta_rank: int = 128, m2p_layers: int = 4) -> float:
    return (m2p_layers / s.layers + 2 * meta_rank / s.hidden) * s.params()  # eq. 45


def m2p_saving(s: Shape, rank: int, m2p_layers: int = 4, mlp: str = "gelu") -> dict:
    """Fraction of FLOPs row/column attention saves over full attention on L*M tokens (section 3.4)."""
    M = memory_tokens(s, rank)
    sparse, full = (m2p_flops(s.layers, M, s.hidden, m2p_layers, mlp, a) for a in ("rowcol", "full"))
    return {"attn": 1 - sparse["m2p/attn"] / full["m2p/attn"], "m2p": 1 - sparse["total"] / full["total"]}


def compare(s: Shape, context: int, question: int, rank: int = 8, meta_rank: int = 128, m2p_layers: int = 4,
            sft_steps: int = 50, merged: bool = False, paper: bool = False) -> dict:
    """{row: {method: value}}: the CLI table and Figure 7. `paper`: no Meta-LoRA, SwiGLU M2P, merged LoRA."""
    if paper:
        meta_rank, merged = 0, True
    amortizable = {"shine": shine_flops(s, context, rank, m2p_layers, meta_rank, "swiglu" if paper else "gelu",
                                        full_last_mlp=paper),
                   "sft": sft_flops(s, context, sft_steps, 0 if paper else rank)}
    gen = lambda m, kv: generation_flops(s, m, question, context, kv, rank, merged)["total"]
    mem = lambda m, kv, att="efficient": BF16 * peak_memory(s, m, question, context, kv, att)["total"] / GiB
    rows = {"amortizable TFLOPs": lambda m: amortizable[m]["total"] / 1e12 if m in amortizable else 0.0,
            "generation TFLOPs/token, no KV": lambda m: gen(m, False) / 1e12,
            "generation GFLOPs/token, KV cache": lambda m: gen(m, True) / 1e9,
            "peak extra GiB bf16, no KV, efficient attn": lambda m: mem(m, False),
            "peak extra GiB bf16, no KV, standard attn": lambda m: mem(m, False, "standard"),
            "peak extra GiB bf16, KV cache": lambda m: mem(m, True)}
    return {name: {m: f(m) for m in METHODS} for name, f in rows.items()}


def load_shape(model: str) -> Shape:
    if model in PRESETS:
        return PRESETS[model]
    from transformers import AutoConfig  # lazily: the formulas need no transformers

    if model.endswith(".json"):
        with open(model) as f:
            cfg = json.load(f)
        return Shape.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    return Shape.from_config(AutoConfig.from_pretrained(model))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen3-8b", help="preset, HF config dir or config.json")
    p.add_argument("--context", type=int, default=1150)
    p.add_argument("--question", type=int, default=200, help="I: prompt + history + question tokens")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--meta-rank", type=int, default=128)
    p.add_argument("--m2p-layers", type=int, default=4)
    p.add_argument("--sft-steps", type=int, default=50, help="T, eq. 35 (Table 1: 10 epochs x 5 conversations)")
    p.add_argument("--merged", action="store_true", help="generated LoRA merged into the weights (no hooks)")
    p.add_argument("--paper", action="store_true", help="paper accounting: no Meta-LoRA, SwiGLU M2P, merged")
    p.add_argument("--sweep", choices=["context"], help="print the Figure 7 series over context lengths")
    a = p.parse_args(argv)
    s = load_shape(a.model)
    kw = dict(rank=a.rank, meta_rank=a.meta_rank, m2p_layers=a.m2p_layers, sft_steps=a.sft_steps,
              merged=a.merged, paper=a.paper)
    print(f"{a.model}: {s}\nD = {s.D:,}  M = {memory_tokens(s, a.rank):,}  I = {a.question}  T = {a.sft_steps}"
          + ("  (paper accounting)" if a.paper else ""))
    head, fmt = "".join(f"{m:>12}" for m in METHODS), lambda row: "".join(f"{row[m]:>12.4g}" for m in METHODS)
    if a.sweep:  # Figure 7: one block per quantity, one line per context length
        tables = {c: compare(s, c, a.question, **kw) for c in CONTEXTS}
        for name in tables[CONTEXTS[0]]:
            lines = [f"{'C = ' + str(c):<44}{fmt(t[name])}" for c, t in tables.items()]
            print(f"\n{name:<44}{head}\n" + "\n".join(lines))
        return
    print(f"\n{'C = ' + str(a.context):<44}{head}")
    for name, row in compare(s, a.context, a.question, **kw).items():
        print(f"{name:<44}{fmt(row)}")
    exact = hypernetwork_params(s, a.rank, a.meta_rank, a.m2p_layers)["total"]
    print(f"\nhypernetwork parameters: {exact:,} (ours), {paper_params(s, a.meta_rank, a.m2p_layers):,.0f} (eq. 45)")
    print(f"\nM2P FLOPs saved by row/column over full attention (L = {s.layers}, L' = {a.m2p_layers})")
    print(f"{'r':>5}{'M':>7}{'attn matmuls':>14}{'M2P (ours)':>12}{'M2P (paper)':>13}")
    for r in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
        ours, paper = (m2p_saving(s, r, a.m2p_layers, mlp) for mlp in ("gelu", "swiglu"))
        print(f"{r:>5}{memory_tokens(s, r):>7}{ours['attn']:>14.2%}{ours['m2p']:>12.2%}{paper['m2p']:>13.2%}")


if __name__ == "__main__":
    main()
