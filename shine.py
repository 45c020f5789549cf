"""SHINE: a scalable in-context hypernetwork that maps a context to a LoRA in a single pass.

Reference implementation of Liu et al., "SHINE: A Scalable In-Context Hypernetwork for Mapping Context to
LoRA in a Single Pass". A frozen Hugging Face causal LM with a trainable Meta-LoRA reads the context followed
by M learnable memory embeddings (section 3.3); the memory tokens' hidden states of all L layers form an
(L, M, H) tensor that the M2P transformer mixes with alternating column (across layers) and row (across
memory tokens) attention and cuts into a rank-r LoRA for every targeted linear of every layer (section 3.4).
The LLM then answers with that LoRA, applied by forward hooks or merged into its weights.

    context + memory -> LLM + Meta-LoRA -> (L, M, H) -> M2P -> {layer: {module: (A, B)}} -> LLM + LoRA

Notable choices:
- LoRA tensors keep the paper's layout, A (I, r) and B (r, O), so the update is x @ A @ B. A generated LoRA
  has a leading batch axis: each sequence of a batch carries its own adapter.
- The generated update is s * x @ A @ B with s = 1e-3, folded in as sqrt(s) on each factor (as the authors'
  code). M2P ends in a LayerNorm, so its outputs are O(1) and a fresh update is about s * sqrt(r * I) times the
  input per element: small enough that the base model's predictions survive (tested), not zero.
- Contexts are left-padded. The memory tokens then sit at the same positions (the last M) in every row, so the
  memory states are a slice rather than a gather; position ids come from the attention mask, so a padded row
  sees the same rotary positions as it would alone.
- Memory states are the decoder layers' outputs (before the final norm), read by hooks; the LM head never runs
  over the context, nor does the last layer's MLP (only its memory rows are read). The answer loss runs the LM
  head only on answer positions (no (B, T, V) logits).
- The M2P reads the raw memory states, as the paper and the authors' code, unless `memory_norm` says otherwise:
  "rms" (each state divided by its RMS) let the context reach SmolLM2-135M's LoRA 2.5x faster in a short probe,
  because raw states carry context-independent massive activations that saturate the first block's attention.
- M2P blocks are post-LN (Appendix A.1) with biases and a GELU MLP of width 2H, one MLP per block shared by all
  tokens (our reading of eq. 9's "the same 2-layer MLP"), like the authors' TransformerEncoderLayer.
- Meta-LoRA, memory embeddings and positional embeddings follow the authors' init: A ~ N(0, 1e-3), B = 0
  (a no-op at first), zeros for the embeddings.
- The hooks add x A B into each linear's output in place (eager: no copy of the output per linear); in a compiled
  decoding step they compute it as broadcast products and sums, which Inductor fuses with neighbouring kernels
  and which read an adapter fastest in `decoding_layout` (each factor stored rank axis outermost).
- `lora_applied` lists the adapters in each linear's `shine_loras` and attaches one hook that adds them, removed
  when the block ends unless kept for torch.compile (`keep_lora_hooks`, `Shine.compile_layers`): a compiled graph
  guards on that attribute, so one graph serves every adapter of a shape and none runs stale without its adapter.
- For inference, `Shine.meta_lora_merged()` runs the memory pass on copies of the targeted weights with the
  Meta-LoRA folded in (no hooks: faster, at the price of the copies' memory); training always takes the hooks.
- Activation checkpointing recomputes layers during backward, outside the `with` block.
  `Shine.enable_activation_checkpointing` therefore restores, during recomputation, the hooks and adapters that
  were active in the forward pass; Hugging Face's own gradient checkpointing would drop them silently, so Shine
  refuses it.
"""
from __future__ import annotations

import json
import math
import warnings
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import pack, rearrange, repeat
from torch import Tensor, nn

LoRA = dict[int, dict[str, tuple[Tensor, Tensor]]]  # {layer: {module: (A (b, I, r) or (I, r), B (b, r, O) or (r, O))}}
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# How a flat chunk of the memory vector is read into A and B (Appendix A.2): "i r" is the matrix A (I, r) in
# row-major order, "r i" its transpose; likewise "r o" / "o r" for B.
RESHAPE_MODES = {"rl": ("i r", "r o"), "rr": ("i r", "o r"), "lr": ("r i", "o r"), "ll": ("r i", "r o")}


# How memory states are scaled before the M2P reads them. A decoder layer's output carries a few "massive
# activations" (values in the thousands, in fixed channels) that do not depend on the context; read raw, they
# saturate the first block's attention. "rms" divides each state by its RMS; "backbone" applies the norm the LLM
# itself applies next (layer l + 1's input norm, the final norm after the last layer), learned gains included:
# it reads those norms' weights outside the layers' forward, so it does not combine with sharding the LLM (FSDP).
MEMORY_NORMS = ("none", "rms", "backbone")


# ----------------------------------------------------------------------------- config
@dataclass
class ShineConfig:
    lora_rank: int = 8  # r, generated LoRA rank (eq. 4)
    meta_lora_rank: int = 128  # rank of the Meta-LoRA used while reading the context (section 5)
    m2p_layers: int = 4  # L', M2P transformer blocks (section 5)
    m2p_heads: int | None = None  # attention heads; None: head dim 128 (authors: 32 heads at H = 4096)
    m2p_mlp_ratio: float = 2.0  # MLP width 2H (eq. 9)
    m2p_first: str = "column"  # block 1 attends across layers (eq. 7), block 2 across memory tokens (eq. 8), ...
    m2p_norm_eps: float = 1e-5  # LayerNorm epsilon of the post-LN blocks (Appendix A.1)
    target_modules: tuple[str, ...] = LLAMA_LINEARS  # linears of a decoder layer, in the order LoRAs are cut (3.4)
    lora_scale: float = 1e-3  # s, generated update s * A @ B
    reshape_mode: str = "rl"  # how A and B are read from the memory vector (Appendix A.2)
    meta_lora_init_std: float = 1e-3 ** 0.5  # A ~ N(0, 1e-3) at init (variance, as the authors), B = 0
    memory_norm: str = "none"  # what the M2P reads: raw memory states (the paper), or normalized ones (MEMORY_NORMS)

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        if self.reshape_mode not in RESHAPE_MODES:
            raise ValueError(f"reshape_mode must be one of {list(RESHAPE_MODES)}, got {self.reshape_mode!r}")
        if self.memory_norm not in MEMORY_NORMS:
            raise ValueError(f"memory_norm must be one of {list(MEMORY_NORMS)}, got {self.memory_norm!r}")
        if self.m2p_first not in ("column", "row"):
            raise ValueError(f"m2p_first must be 'column' or 'row', got {self.m2p_first!r}")
        if min(self.lora_rank, self.meta_lora_rank, self.m2p_layers) < 1 or not self.target_modules:
            raise ValueError("lora_rank, meta_lora_rank, m2p_layers must be >= 1 and target_modules non-empty")


# ----------------------------------------------------------------------------- the backbone's linears
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (`model.model.layers` for Llama/Qwen)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no decoder `layers` list; SHINE needs a Llama-style model")
    return layers


def target_linears(model: nn.Module, target_modules: tuple[str, ...]) -> list[dict[str, nn.Linear]]:
    """For each decoder layer, its target linears by name, e.g. [{"q_proj": Linear, ...}, ...]."""
    per_layer = []
    for i, layer in enumerate(decoder_layers(model)):
        linears = {n.rsplit(".", 1)[-1]: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        missing = [name for name in target_modules if name not in linears]
        if missing:
            raise ValueError(f"decoder layer {i} has no linear named {missing}; its linears are {sorted(linears)}. "
                             "Set ShineConfig.target_modules to names this model uses.")
        per_layer.append({name: linears[name] for name in target_modules})
    return per_layer


def lora_shapes(model: nn.Module, target_modules: tuple[str, ...] = LLAMA_LINEARS) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target linear, read from the model (the same in every layer)."""
    per_layer = target_linears(model, target_modules)
    shapes = {name: (m.in_features, m.out_features) for name, m in per_layer[0].items()}
    for i, linears in enumerate(per_layer):
        if {name: (m.in_features, m.out_features) for name, m in linears.items()} != shapes:
            raise ValueError(f"decoder layer {i} has other linear shapes than layer 0; SHINE needs one D (eq. 4)")
    return shapes


def num_memory_tokens(rank: int, shapes: dict[str, tuple[int, int]], hidden: int) -> int:
    """M = ceil(r * D / H) (eq. 4), D = sum of in + out features of one layer's target linears."""
    return math.ceil(rank * sum(i + o for i, o in shapes.values()) / hidden)


# ----------------------------------------------------------------------------- LoRA hooks
def _lora_pairs(model: nn.Module, lora: LoRA, single: bool = False):
    """Yield (layer, name, linear, A, B) after checking the LoRA fits the model; `single` wants one adapter and
    drops its batch axis."""
    layers = decoder_layers(model)
    if sorted(lora) != list(range(len(layers))):
        raise ValueError(f"LoRA covers layers {sorted(lora)[:4]}... ({len(lora)}), the model has {len(layers)} layers")
    modules = tuple(lora[0])
    for i, linears in enumerate(target_linears(model, modules)):
        for name, linear in linears.items():
            A, B = lora[i][name]
            if A.shape[-2] != linear.in_features or B.shape[-1] != linear.out_features or A.shape[-1] != B.shape[-2]:
                raise ValueError(f"LoRA for layer {i} {name} has A {tuple(A.shape)}, B {tuple(B.shape)}; the linear "
                                 f"maps {linear.in_features} -> {linear.out_features}")
            if single and A.dim() == 3:
                if A.shape[0] != 1:
                    raise ValueError(f"one adapter at a time, please; got a batch of {A.shape[0]}")
                A, B = A[0], B[0]
            yield i, name, linear, A, B


FUSED_LORA_TOKENS = 16  # under torch.compile, up to this many tokens a sequence take _add_lora's fusable sums


def _per_sequence(A: Tensor, B: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """3-D A, B matched to `batch` sequences: generate() with num_return_sequences or beams repeats each example
    k times in a row, so each adapter is repeated k times too."""
    if A.dim() == 3 and batch != A.shape[0]:
        if batch % A.shape[0]:
            raise ValueError(f"batch of {batch} sequences but {A.shape[0]} adapters")
        k = batch // A.shape[0]
        A, B = A.repeat_interleave(k, 0), B.repeat_interleave(k, 0)
    return A, B


def lora_delta(x: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """x (b, t, I) @ A (b, I, r) @ B (b, r, O) -> (b, t, O), each example with its own A, B; 2-D A, B are shared."""
    A, B = _per_sequence(A, B, x.shape[0])
    return x @ A @ B  # batched matmul over b when A, B are 3-D


def _add_lora(module: nn.Module, inputs: tuple, output: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """output + scale * x A B: two matmul kernels per linear, the second adding into the linear's output in place
    (beta = 1). Out of place, cuBLAS would first copy the output (one more kernel and pass per linear: 252 copies
    per adapter generation at Qwen3-8B's shape, ~4% of it at batch 8). In place is safe for autograd: a linear's
    backward needs its input and weight, never its output (and autograd would refuse otherwise).
    Under torch.compile nothing is added in place (Inductor plans its own buffers). Decoding steps (a few tokens)
    take the sums; longer inputs without autograd a matmul and a plain add, which Inductor fuses into the next
    elementwise kernel where an addmm would first copy the output (batch-8 generation at Qwen3-8B's shape on one
    H100: 371-374 -> 350 ms); with autograd the addmm stays (the plain add slowed the compiled training step there,
    378 -> 410 ms: results/speed_h100_compiled_lora_add.json)."""
    x = inputs[0]
    if A.dtype != x.dtype:  # FSDP mixed precision: the weights were fp32 shards when the hooks were attached
        A, B = A.to(x.dtype), B.to(x.dtype)
    A, B = _per_sequence(A, B, x.shape[0])
    compiling = torch.compiler.is_compiling()
    if compiling and x.dim() == 3 and x.shape[1] <= FUSED_LORA_TOKENS:
        if A.dim() == 3:
            A, B = rearrange(A, "b i r -> b 1 i r"), rearrange(B, "b r o -> b 1 r o")
        xA = (rearrange(x, "b t i -> b t i 1") * A).sum(-2)  # (b, t, r)
        return output + scale * (rearrange(xA, "b t r -> b t r 1") * B).sum(-2)  # (b, t, O)
    if A.dim() == 2:  # one adapter for every sequence: a plain matmul over all tokens
        xA, out = x.reshape(-1, x.shape[-1]) @ A, output.reshape(-1, output.shape[-1])  # (b t, r), (b t, O)
        mm, add_in_place, add = torch.mm, torch.Tensor.addmm_, torch.addmm
    else:  # bmm, not `@`: matmul's shape dispatch costs more CPU time per call than the kernel takes on a GPU
        xA, out = torch.bmm(x, A), output  # (b, t, r), (b, t, O)
        mm, add_in_place, add = torch.bmm, torch.Tensor.baddbmm_, torch.baddbmm
    if compiling and not torch.is_grad_enabled():  # see the docstring
        result = out + scale * mm(xA, B)
    else:
        in_place = not compiling and out.dtype == xA.dtype == B.dtype  # in-place ops skip autocast's casts
        result = (add_in_place if in_place else add)(out, xA, B, alpha=scale)  # out + xA @ B
    return result.view_as(output) if A.dim() == 2 else result


def decoding_layout(lora: LoRA) -> LoRA:
    """The same adapter, each factor copied so that its rank axis is the outer one in memory: A (…, I, r) is
    stored as rows of A^T (…, r, I) and B (…, r, O) as rows of B^T (…, O, r), peft's layout. Shapes, values
    and results are unchanged; only strides differ (A.mT and B.mT are contiguous).

    For compiled decoding (`keep_lora_hooks`): a decoding step reduces x A over I and (x A) B over r, and
    Inductor's reductions read memory fastest when the reduced axis is the contiguous one. At Qwen3-8B's shape on
    one H100, with one adapter per sequence, a compiled decoding step took 1.15x -> 1.07x the base's at batch 16
    and 1.20x -> 1.18x at batch 1 (results/speed_h100_compile_decoding_layout.json). Copies the adapter once:
    one kernel per module and factor (layers are stacked), not one per tensor. Eager decoding's cuBLAS matmuls
    take either layout as it is (a transposed operand, no copy). Call it on factors already in the weights' dtype
    (`generate_lora` gives them so): a cast in `lora_applied`, like the repeat for beams, makes default-layout copies.
    """
    layers = sorted(lora)
    out = {l: {} for l in layers}
    for name in lora[layers[0]]:
        # stack copies the transposed views: the result (L, …, r, I) is contiguous, its slices' .mT are A again
        A_T, B_T = (torch.stack([lora[l][name][k].mT for l in layers]) for k in (0, 1))
        for l, A_t, B_t in zip(layers, A_T.unbind(0), B_T.unbind(0)):
            out[l][name] = (A_t.mT, B_t.mT)
    return out


def _cast_together(tensors: list[Tensor], dtypes: list[torch.dtype]) -> list[Tensor]:
    """Each tensor in its dtype, those needing the same cast concatenated, cast and split into views: a kernel or
    two instead of one cast per tensor (2 x 7 x L for a LoRA, and as many in backward). The training step is bound
    by kernel launches: at Qwen3-8B's shape this took it from 596 to 524 ms
    (results/speed_h100_train_metalora_cast.json), at the price of a transient copy."""
    out = list(tensors)
    for dtype in set(dtypes):
        cast = [k for k, (t, d) in enumerate(zip(tensors, dtypes)) if d == dtype and t.dtype != d]
        if cast:
            flat = torch.cat([tensors[k].reshape(-1) for k in cast]).to(dtype)
            for k, piece in zip(cast, flat.split([tensors[k].numel() for k in cast])):
                out[k] = piece.view_as(tensors[k])
    return out


def _apply_loras(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    """The one forward hook of a target linear: adds each adapter listed in its `shine_loras` attribute."""
    for A, B, scale in module.shine_loras:  # () when idle: a compiled graph guards on its length and shapes
        output = _add_lora(module, inputs, output, A, B, scale)
    return output


def _put_loras(module: nn.Module, loras: tuple | None) -> None:
    """Set a module's `shine_loras`, or remove the attribute (None): what `lora_applied` and recomputation restore."""
    module.__dict__.pop("shine_loras", None)
    if loras is not None:
        module.shine_loras = loras


def _has_lora_hook(linear: nn.Module) -> bool:
    return any(hook is _apply_loras for hook in linear._forward_hooks.values())


def keep_lora_hooks(model: nn.Module, target_modules: tuple[str, ...] = LLAMA_LINEARS) -> None:
    """Attach the LoRA hook to every target linear for good, for torch.compile (see `compile_layers`).

    `lora_applied` then only sets each linear's `shine_loras` and never adds or removes a hook. A compiled graph
    reads that attribute, so dynamo guards on it: adapters of the same shape reuse one graph, and a graph traced
    without an adapter is not replayed with one. Hooks added and removed per block would not be guarded by
    default (torch._dynamo.config.skip_nnmodule_hook_guards): a graph compiled without them would silently run
    on. The idle hook costs eager calls ~3 us per linear (a 2-core CPU); `drop_lora_hooks` detaches it.
    """
    for linears in target_linears(model, target_modules):
        for linear in linears.values():
            if not _has_lora_hook(linear):
                linear.shine_loras = ()
                linear.register_forward_hook(_apply_loras)


def drop_lora_hooks(model: nn.Module) -> None:
    """Undo `keep_lora_hooks` (outside any `lora_applied` block)."""
    for module in model.modules():
        for key in [k for k, hook in module._forward_hooks.items() if hook is _apply_loras]:
            del module._forward_hooks[key]
        _put_loras(module, None)


@contextmanager
def lora_applied(model: nn.Module, lora: LoRA, scale: float = 1.0):
    """Within the block, every target linear computes y = x W^T + scale * x A B. Blocks nest (their LoRAs add up);
    on exit the model is as before: the hooks this block attached are removed, kept ones (`keep_lora_hooks`) stay."""
    linears, factors, dtypes = [], [], []
    for _, _, linear, A, B in _lora_pairs(model, lora):
        linears.append(linear)
        factors += [A, B]
        dtypes += [linear.weight.dtype] * 2
    factors = _cast_together(factors, dtypes)  # once here, not once per decoded token, and all together
    before, handles = [], []
    try:
        for linear, A, B in zip(linears, factors[::2], factors[1::2]):
            before.append((linear, linear.__dict__.get("shine_loras")))
            linear.shine_loras = (before[-1][1] or ()) + ((A, B, scale),)
            if not _has_lora_hook(linear):
                handles.append(linear.register_forward_hook(_apply_loras))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for linear, loras in before:
            _put_loras(linear, loras)


@torch.no_grad()
def merge_lora(model: nn.Module, lora: LoRA, scale: float = 1.0,
               keep_on: str | torch.device | None = "cpu") -> dict[tuple[int, str], Tensor]:
    """Fold one adapter into the weights, W <- W + scale (A B)^T (section 3.5: zero inference overhead).

    Writes into the model's weights (in place, so compiled graphs and CUDA graphs that captured them see the
    update). Returns copies of the original weights for `unmerge_lora`, which restores them bit for bit;
    subtracting the update again would not, in bf16. `keep_on` = "cpu" spares accelerator memory but copies
    every targeted weight to the host (17 s for an 8B model on our H100 host); None keeps the copies beside the
    weights (0.15 s, at the price of a second copy of the targeted weights in GPU memory).
    """
    originals = {}
    for i, name, linear, A, B in _lora_pairs(model, lora, single=True):
        originals[i, name] = linear.weight.detach().to(keep_on or linear.weight.device, copy=True)
        linear.weight.copy_(_merged_weight(linear, A, B, scale))
    return originals


def _merged_weight(linear: nn.Linear, A: Tensor, B: Tensor, scale: float = 1.0) -> Tensor:
    """W + scale (A B)^T (O, I), summed in fp32, in the weight's dtype and on its device."""
    update = scale * (A.float() @ B.float()).T.to(linear.weight.device)  # (O, I), like the weight
    return (linear.weight.float() + update).to(linear.weight.dtype)


@torch.no_grad()
def unmerge_lora(model: nn.Module, originals: dict[tuple[int, str], Tensor]) -> None:
    """Restore the weights saved by `merge_lora`."""
    modules = sorted({name for _, name in originals})
    per_layer = target_linears(model, tuple(modules))
    for (i, name), weight in originals.items():
        per_layer[i][name].weight.copy_(weight)


@contextmanager
def lora_merged(model: nn.Module, lora: LoRA, scale: float = 1.0, keep_on: str | torch.device | None = "cpu"):
    """`merge_lora` for the duration of the block, then `unmerge_lora`."""
    originals = merge_lora(model, lora, scale, keep_on)
    try:
        yield model
    finally:
        unmerge_lora(model, originals)


def save_peft_adapter(model: nn.Module, lora: LoRA, directory: str | Path, base_model_name_or_path: str = "") -> Path:
    """Write one adapter as a peft LoRA folder (adapter_config.json + adapter_model.safetensors).

    peft stores lora_A.weight (r, I) = A^T and lora_B.weight (O, r) = B^T and scales by lora_alpha / r; we set
    lora_alpha = r because the generated LoRA already carries its scale.
    """
    from safetensors.torch import save_file

    paths = {id(m): n for n, m in model.named_modules()}
    tensors, rank = {}, None
    for _, _, linear, A, B in _lora_pairs(model, lora, single=True):
        rank = A.shape[-1]
        key = f"base_model.model.{paths[id(linear)]}"
        tensors[f"{key}.lora_A.weight"] = A.T.detach().contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = B.T.detach().contiguous().cpu()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
              "target_modules": list(lora[0]), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "base_model_name_or_path": base_model_name_or_path or getattr(model.config, "_name_or_path", "")}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


# ----------------------------------------------------------------------------- Meta-LoRA
class LoRAWeights(nn.Module):
    """A (I, r) and B (r, O) of one linear."""

    def __init__(self, in_features: int, out_features: int, rank: int, init_std: float):
        super().__init__()
        self.A = nn.Parameter(torch.randn(in_features, rank) * init_std)
        self.B = nn.Parameter(torch.zeros(rank, out_features))  # zero: the Meta-LoRA starts as a no-op


class MetaLoRA(nn.Module):
    """Trainable LoRA on the target linears, active only while the LLM reads the context (section 3.3)."""

    def __init__(self, num_layers: int, shapes: dict[str, tuple[int, int]], rank: int, init_std: float):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({name: LoRAWeights(i, o, rank, init_std) for name, (i, o) in shapes.items()})
            for _ in range(num_layers))

    def as_lora(self) -> LoRA:
        return {l: {name: (w.A, w.B) for name, w in layer.items()} for l, layer in enumerate(self.layers)}


# ----------------------------------------------------------------------------- memory extraction
def _positions(mask: Tensor) -> Tensor:
    """Position ids that skip left padding: mask (B, T) -> (B, T)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _check_context(ids: Tensor, mask: Tensor, num_memory: int, window: int | None) -> None:
    if ids.dim() != 2 or ids.shape != mask.shape:
        raise ValueError(f"context_ids and context_mask must both be (B, N); got {tuple(ids.shape)}, "
                         f"{tuple(mask.shape)}")
    lengths = mask.sum(-1)
    if ids.shape[1] == 0 or (lengths == 0).any():
        raise ValueError("empty context: every row needs at least one token")
    if window is not None and ids.shape[1] + num_memory > window:
        raise ValueError(f"context of {ids.shape[1]} tokens + {num_memory} memory tokens exceeds the model's "
                         f"window of {window}; truncate the context")
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError("contexts must be left-padded (tokenizer.padding_side = 'left') so memory tokens follow them")


def _layer_output(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _on_last_rows(module: nn.Module, rows: int):
    """Within the block, a row-wise `module` (B, T, I) -> (B, T, O) computes only its input's last `rows`
    positions and gives zeros for the others. For the memory pass's last MLP: nothing reads the last layer's
    output at context rows (just as nothing reads the LM head's), so computing it there is waste: at Qwen3-8B's
    shape, one layer's MLP over 1,150 context rows, 1.8% of the memory pass's FLOPs. An instance `forward`, not
    hooks: dynamo guards on it, so a compiled layer does not replay the sliced graph once the block ends."""
    own = module.__dict__.get("forward")  # an earlier override (a compiled forward, say) comes back afterwards
    full = module.forward
    module.forward = lambda x: F.pad(full(x[:, -rows:]), (0, 0, x.shape[1] - rows, 0))
    try:
        yield
    finally:
        _put_forward(module, own)


def _put_forward(module: nn.Module, forward) -> None:
    """Set a module's instance `forward`, or remove it (None) so that its class's forward runs."""
    module.__dict__.pop("forward", None)
    if forward is not None:
        module.forward = forward


def _same_hooks_on_recompute(layer: nn.Module):
    """checkpoint's context_fn: recompute `layer` with the forward hooks, LoRAs and instance forwards (the last
    MLP's `_on_last_rows`) its submodules had in forward."""
    modules = [m for m in layer.modules() if m is not layer]
    state = lambda m: (m._forward_hooks, m.__dict__.get("shine_loras"), m.__dict__.get("forward"))
    saved = [(OrderedDict(hooks), loras, forward) for hooks, loras, forward in map(state, modules)]

    def put(states: list) -> None:
        for m, (hooks, loras, forward) in zip(modules, states):
            m._forward_hooks = hooks
            _put_loras(m, loras)
            _put_forward(m, forward)

    @contextmanager
    def recompute():
        current = list(map(state, modules))
        put(saved)
        try:
            yield
        finally:
            put(current)

    return nullcontext(), recompute()


# ----------------------------------------------------------------------------- M2P transformer
class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention, q/k/v packed like torch's MultiheadAttention in_proj."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"M2P hidden size {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:  # (S, T, H): S independent sequences of length T
        q, k, v = rearrange(self.qkv(x), "s t (three n d) -> three s n t d", three=3, n=self.heads)
        y = F.scaled_dot_product_attention(q, k, v)  # no mask: every token sees every other
        return self.out(rearrange(y, "s n t d -> s t (n d)"))


class M2PBlock(nn.Module):
    """Post-LN block (eq. 14) attending along one axis of the (L, M) grid: 'column' across layers, 'row' across
    memory tokens (eqs. 7-8), then a 2-layer MLP on every token (eq. 9)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, eps: float, axis: str):
        super().__init__()
        self.axis = axis
        self.attn = SelfAttention(hidden, heads)
        self.norm1 = nn.LayerNorm(hidden, eps=eps)
        width = int(mlp_ratio * hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, hidden))
        self.norm2 = nn.LayerNorm(hidden, eps=eps)

    def forward(self, z: Tensor) -> Tensor:  # (B, L, M, H)
        b, l, m, _ = z.shape
        if self.axis == "column":
            seq = rearrange(z, "b l m h -> (b m) l h")  # one sequence of length L per memory token
        else:
            seq = rearrange(z, "b l m h -> (b l) m h")  # one sequence of length M per layer
        seq = self.norm1(seq + self.attn(seq))
        seq = self.norm2(seq + self.mlp(seq))
        if self.axis == "column":
            return rearrange(seq, "(b m) l h -> b l m h", b=b)
        return rearrange(seq, "(b l) m h -> b l m h", b=b)


class M2PTransformer(nn.Module):
    """Memory states (B, L, M, H) -> same shape, mixed across layers and memory tokens (section 3.4)."""

    def __init__(self, num_layers: int, num_memory: int, hidden: int, depth: int, heads: int, mlp_ratio: float,
                 eps: float = 1e-5, first: str = "column"):
        super().__init__()
        self.layer_embedding = nn.Parameter(torch.zeros(num_layers, hidden))  # P^layer (eq. 5)
        self.token_embedding = nn.Parameter(torch.zeros(num_memory, hidden))  # P^token (eq. 5)
        axes = ("column", "row") if first == "column" else ("row", "column")
        self.blocks = nn.ModuleList(M2PBlock(hidden, heads, mlp_ratio, eps, axes[i % 2]) for i in range(depth))

    def forward(self, memory: Tensor) -> Tensor:
        z = memory + rearrange(self.layer_embedding, "l h -> l 1 h") + rearrange(self.token_embedding, "m h -> 1 m h")
        for block in self.blocks:  # eq. 6, then eqs. 7-9 per block
            z = block(z)
        return z


# ----------------------------------------------------------------------------- parameter generation
def lora_from_states(states: Tensor, shapes: dict[str, tuple[int, int]], rank: int, mode: str = "rl",
                     scale: float = 1e-3, dtype: torch.dtype | None = None) -> LoRA:
    """Cut M2P outputs into LoRAs (section 3.4, Appendix A.2).

    states (B, L, M, H): layer l's M*H values, flattened, are read in module order as A (I x r) then B (r x O).
    Returns {l: {module: (A (B, I, r), B (B, r, O))}}, each factor times sqrt(scale), in `dtype` (default: the
    states'). Casting here is one kernel on one contiguous tensor; lora_applied would otherwise gather 2 x 7 x L
    views to cast them together, which took 10% longer per 8B training micro-step (results/
    speed_h100_train_generated_cast.json).
    """
    v = (rearrange(states, "b l m h -> b l (m h)") * math.sqrt(scale)).to(dtype or states.dtype)
    needed = rank * sum(i + o for i, o in shapes.values())
    if v.shape[-1] < needed:
        raise ValueError(f"memory holds {v.shape[-1]} values per layer, the LoRA needs {needed} (eq. 4)")
    a_order, b_order = RESHAPE_MODES[mode]
    # split and unbind, not v[..., t:t + n] and A[:, l]: their backward is one cat / stack each, where 2 x 7 x L
    # slices would each scatter their gradient into a zero tensor of the whole (2,000 kernels at Qwen3-8B's shape)
    chunks = iter(v.split([n for i, o in shapes.values() for n in (i * rank, rank * o)] + [v.shape[-1] - needed], -1))
    per_module = {}
    for name, (i, o) in shapes.items():
        A = rearrange(next(chunks), f"b l ({a_order}) -> b l i r", i=i, r=rank)
        B = rearrange(next(chunks), f"b l ({b_order}) -> b l r o", r=rank, o=o)
        per_module[name] = (A.unbind(1), B.unbind(1))  # per layer
    return {l: {name: (A[l], B[l]) for name, (A, B) in per_module.items()} for l in range(states.shape[1])}


def _default_heads(hidden: int) -> int:
    head_dim = next((d for d in (128, 64, 32, 16, 8) if hidden % d == 0), hidden)
    return hidden // head_dim


# ----------------------------------------------------------------------------- the SHINE model
class Shine(nn.Module):
    """A frozen causal LM plus the trainable hypernetwork: memory embeddings, Meta-LoRA and M2P transformer."""

    def __init__(self, llm: nn.Module, config: ShineConfig | None = None):
        super().__init__()
        # transformers >= 5.24 calls it is_activation_checkpointing (the old name warns); both are properties
        checkpointing = getattr(llm, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(llm, "is_gradient_checkpointing", False)
        if checkpointing:
            raise ValueError("disable Hugging Face gradient checkpointing: its recomputation would run without the "
                             "LoRA hooks (see the module docstring)")
        self.config = config = config or ShineConfig()
        self.llm = llm.requires_grad_(False)
        self.shapes = lora_shapes(llm, config.target_modules)
        self.num_layers = len(decoder_layers(llm))  # L
        self.hidden_size = llm.get_input_embeddings().embedding_dim  # H
        self.num_memory = num_memory_tokens(config.lora_rank, self.shapes, self.hidden_size)  # M (eq. 4)
        L, M, H = self.num_layers, self.num_memory, self.hidden_size
        with torch.device(next(llm.parameters()).device):  # "meta" builds a shape-only SHINE
            self.memory = nn.Parameter(torch.zeros(M, H))  # M_0, the memory embeddings (eq. 1)
            self.meta_lora = MetaLoRA(L, self.shapes, config.meta_lora_rank, config.meta_lora_init_std)
            self.m2p = M2PTransformer(L, M, H, config.m2p_layers, config.m2p_heads or _default_heads(H),
                                      config.m2p_mlp_ratio, config.m2p_norm_eps, config.m2p_first)
        self._meta_merged = None  # (weights, Meta-LoRA versions) inside meta_lora_merged()

    def compile_layers(self, **compile_kwargs) -> None:
        """torch.compile the forward of every decoder layer and every M2P block (regional compilation).

        Eager, the backbone's small elementwise kernels (RMSNorm, RoPE, SiLU, residuals, the LoRA adds) make a
        step bound by kernel launches; compiled, they fuse. The layers of each kind share one graph (the same
        code, their weights and LoRAs are graph inputs), so compiling costs one layer, not L. The LoRA hooks
        stay attached from now on (`keep_lora_hooks`). Call before `enable_activation_checkpointing`, which then
        recomputes the compiled layers; module hooks (memory reading, FSDP) run outside the compiled forwards.
        A decoder layer needs about ten graphs (memory pass with the Meta-LoRA, answer pass with a batch of LoRAs,
        the bare model; with and without autograd; static, then dynamic shapes), more than dynamo's default limit
        of 8 per function, past which it silently runs the rest eagerly: the limit is raised to 64 (globally).
        """
        if getattr(self, "_checkpointing", False):
            raise RuntimeError("compile_layers must come before enable_activation_checkpointing")
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        keep_lora_hooks(self.llm, self.config.target_modules)
        for layer in [*decoder_layers(self.llm), *self.m2p.blocks]:
            layer.forward = torch.compile(layer.forward, **compile_kwargs)

    def enable_activation_checkpointing(self) -> None:
        """Recompute each decoder layer in backward instead of storing its activations, hooks included."""
        from torch.utils.checkpoint import checkpoint

        self._checkpointing = True
        for layer in decoder_layers(self.llm):
            forward = layer.forward
            layer.forward = lambda *args, _f=forward, _l=layer, **kw: checkpoint(
                _f, *args, use_reentrant=False, context_fn=partial(_same_hooks_on_recompute, _l), **kw)

    def memory_states(self, context_ids: Tensor, context_mask: Tensor | None = None) -> Tensor:
        """Eqs. 1-3: context_ids, context_mask (B, N), left-padded -> memory states (B, L, M, H)."""
        if context_mask is None:
            context_mask = torch.ones_like(context_ids)
        M = self.num_memory
        _check_context(context_ids, context_mask, M, getattr(self.llm.config, "max_position_embeddings", None))
        x = self.llm.get_input_embeddings()(context_ids)  # (B, N, H)
        memory = repeat(self.memory, "m h -> b m h", b=x.shape[0]).to(x.dtype)
        h0, _ = pack([x, memory], "b * h")  # (B, N + M, H), eq. 1
        mask = F.pad(context_mask, (0, M), value=1)
        states = []
        read = lambda module, inputs, output: states.append(_layer_output(output)[:, -M:])  # eq. 2
        layers = decoder_layers(self.llm)
        handles = [layer.register_forward_hook(read) for layer in layers]
        decoder = self.llm.get_decoder()
        inputs = dict(inputs_embeds=h0, attention_mask=mask, position_ids=_positions(mask), use_cache=False)
        last_mlp = getattr(layers[-1], "mlp", None)  # only its memory rows are read: skip the context rows
        try:
            with _on_last_rows(last_mlp, M) if last_mlp is not None else nullcontext():
                if self._meta_merged is not None:  # inside meta_lora_merged(): the weights W + A B, no hooks
                    torch.func.functional_call(decoder, self._current_meta_merged(), (), inputs)
                else:
                    with lora_applied(self.llm, self.meta_lora.as_lora()):
                        decoder(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack(states, dim=1)  # (B, L, M, H), eq. 3

    @contextmanager
    def meta_lora_merged(self):
        """For inference: within the block, the memory pass runs on weights with the Meta-LoRA folded in, W + A B,
        instead of adding x A B through hooks. Saves the Meta-LoRA's work per pass (at Qwen3-8B's shape, batch
        8: two more GEMMs per linear and a read and write of every linear's output, ~58 of 366 ms of GPU time in
        results/profile_gen_b8_h100_compiled.txt) at the price of a copy of the targeted weights while the block
        lasts (made once on entry: ~14 GB for an 8B model in bf16). The LLM's own weights are untouched (answers
        still run on W). Results equal the hooks' to the weights' rounding. Not for training: no gradient reaches
        the Meta-LoRA through merged weights, so a memory pass that could need one raises, as does one after the
        Meta-LoRA changed inside the block. Not with the LLM sharded (FSDP --fsdp-llm): each rank holds a shard.
        """
        decoder = self.llm.get_decoder()
        where = {module: name for name, module in decoder.named_modules()}
        with torch.no_grad():
            weights = {f"{where[linear]}.weight": _merged_weight(linear, A, B)
                       for _, _, linear, A, B in _lora_pairs(self.llm, self.meta_lora.as_lora())}
        self._meta_merged = (weights, [p._version for p in self.meta_lora.parameters()])
        try:
            yield self
        finally:
            self._meta_merged = None

    def _current_meta_merged(self) -> dict[str, Tensor]:
        weights, versions = self._meta_merged
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.meta_lora.parameters()):
            raise RuntimeError("meta_lora_merged() is for inference: no gradient reaches the Meta-LoRA through "
                               "merged weights (run under torch.no_grad(), or outside the block)")
        if [p._version for p in self.meta_lora.parameters()] != versions:
            raise RuntimeError("the Meta-LoRA changed inside meta_lora_merged(): its merged weights are stale")
        return weights

    def normalize_memory(self, states: Tensor) -> Tensor:
        """Memory states (B, L, M, H) scaled as config.memory_norm says (MEMORY_NORMS); same shape."""
        if self.config.memory_norm == "rms":
            return states * torch.rsqrt(states.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(states.dtype)
        if self.config.memory_norm == "backbone":
            norms = [layer.input_layernorm for layer in decoder_layers(self.llm)[1:]] + [self.llm.get_decoder().norm]
            return torch.stack([norm(states[:, l]) for l, norm in enumerate(norms)], dim=1)
        return states

    def generate_lora(self, context_ids: Tensor, context_mask: Tensor | None = None) -> LoRA:
        """Context (B, N) -> one LoRA per row, in the LLM's dtype: {layer: {module: (A (B, I, r), B (B, r, O))}}."""
        states = self.normalize_memory(self.memory_states(context_ids, context_mask))
        mixed = self.m2p(states.to(self.memory.dtype))
        c = self.config
        return lora_from_states(mixed, self.shapes, c.lora_rank, c.reshape_mode, c.lora_scale, self.llm.dtype)

    def answer_loss(self, lora: LoRA, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                    reduction: str = "mean") -> Tensor:
        """Cross-entropy of the answer tokens under the LoRA (eqs. 10-12).

        input_ids, attention_mask, labels (B, T); labels are -100 outside the answers and are shifted here as in
        Hugging Face (labels[t] is predicted at t - 1). reduction "mean" over answer tokens, or "sum".
        """
        targets = labels[:, 1:]
        keep = targets != -100
        if not keep.any():
            raise ValueError("no answer tokens: every label is -100")
        with lora_applied(self.llm, lora):
            hidden = self.llm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                            position_ids=_positions(attention_mask), use_cache=False).last_hidden_state
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][keep])  # (n_answer_tokens, V)
        return F.cross_entropy(logits.float(), targets[keep], reduction=reduction)

    def forward(self, context_ids: Tensor, context_mask: Tensor, input_ids: Tensor, attention_mask: Tensor,
                labels: Tensor, reduction: str = "mean") -> Tensor:
        """Training loss: generate a LoRA from each context, then score its answers (section 4)."""
        return self.answer_loss(self.generate_lora(context_ids, context_mask), input_ids, attention_mask, labels,
                                reduction)

    @torch.no_grad()
    def generate(self, context_ids: Tensor, context_mask: Tensor | None, input_ids: Tensor,
                 attention_mask: Tensor | None = None, **generate_kwargs) -> Tensor:
        """Answer prompts (B, T), left-padded, each with the LoRA of its own context; returns new tokens only.

        Accepts every `model.generate` keyword (greedy, sampling, max_new_tokens, ...); the KV cache works as
        usual because the hooks only change the linears' outputs.
        """
        lora = self.generate_lora(context_ids, context_mask)
        with lora_applied(self.llm, lora):
            out = self.llm.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        return out[:, input_ids.shape[1]:]

    # ------------------------------------------------------------------------- parameters and persistence
    def hypernetwork_state_dict(self) -> dict[str, Tensor]:
        """What SHINE trains: memory embeddings, Meta-LoRA and M2P (never the LLM)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("llm.")}

    def parameter_report(self) -> dict[str, int | float]:
        """Trainable parameter counts next to the paper's estimate (L'/L + 2R/H) P (eq. 45)."""
        count = lambda module: sum(p.numel() for p in module.parameters())
        report = {"memory": self.memory.numel(), "meta_lora": count(self.meta_lora), "m2p": count(self.m2p)}
        report["total"] = sum(report.values())
        report["llm"] = count(self.llm)
        c = self.config
        ratio = c.m2p_layers / self.num_layers + 2 * c.meta_lora_rank / self.hidden_size
        report["eq45_estimate"] = ratio * report["llm"]
        return report

    def backbone_signature(self) -> dict:
        return {"num_layers": self.num_layers, "hidden_size": self.hidden_size,
                "shapes": {n: list(s) for n, s in self.shapes.items()},
                "name_or_path": getattr(self.llm.config, "_name_or_path", "")}

    def save_hypernetwork(self, directory: str | Path, state: dict[str, Tensor] | None = None) -> Path:
        """Write hypernetwork.safetensors and shine_config.json (the config and the backbone's shape).

        `state` replaces `hypernetwork_state_dict()`, e.g. with full tensors gathered from FSDP shards.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.hypernetwork_state_dict() if state is None else state
        save_file({n: p.detach().contiguous().cpu() for n, p in state.items()}, directory / "hypernetwork.safetensors")
        meta = {"shine": asdict(self.config), "backbone": self.backbone_signature()}
        (directory / "shine_config.json").write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, llm: nn.Module, directory: str | Path) -> "Shine":
        """Rebuild SHINE on `llm` from `save_hypernetwork` files; refuses a backbone of another shape."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / "shine_config.json").is_file():
            raise FileNotFoundError(f"{directory} holds no shine_config.json; is it a SHINE checkpoint?")
        meta = json.loads((directory / "shine_config.json").read_text())
        shine = cls(llm, ShineConfig(**meta["shine"]))
        saved, ours = meta["backbone"], shine.backbone_signature()
        shape_keys = ("num_layers", "hidden_size", "shapes")
        if any(saved[k] != ours[k] for k in shape_keys):
            raise ValueError(f"checkpoint {directory} was trained on {saved['name_or_path'] or 'another backbone'} "
                             f"(L={saved['num_layers']}, H={saved['hidden_size']}, linears {saved['shapes']}); this "
                             f"backbone has L={ours['num_layers']}, H={ours['hidden_size']}, linears {ours['shapes']}")
        if saved["name_or_path"] and ours["name_or_path"] and saved["name_or_path"] != ours["name_or_path"]:
            warnings.warn(f"checkpoint trained on {saved['name_or_path']}, loading onto {ours['name_or_path']} "
                          "(same shape)")
        try:
            tensors = load_file(directory / "hypernetwork.safetensors", device=str(shine.memory.device))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"cannot read {directory / 'hypernetwork.safetensors'}: {error}") from error
        params = shine.hypernetwork_state_dict()
        if tensors.keys() != params.keys() or any(tensors[n].shape != p.shape for n, p in params.items()):
            missing = sorted(params.keys() - tensors.keys())[:3]
            raise ValueError(f"{directory} does not match this SHINE config (missing e.g. {missing})")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])
        return shine
