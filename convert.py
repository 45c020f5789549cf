"""Run the authors' released SHINE checkpoints through shine.py: convert their files into our format.

The paper's authors published hypernetworks for Qwen3-8B on the Hugging Face hub (`Yewei-Liu/SHINE-Pretrain`,
`Yewei-Liu/SHINE-ift_mqa`, `Yewei-Liu/SHINE-ift_mqa_1qa`), three `torch.save` files each, written by their code
(github.com/MuLabPKU/SHINE). Names and shapes, read from their code (H = 4096, L = 36, M = 148 for Qwen3-8B):

    mem_tokens.pt    Parameter (M, H)                                     -> memory
    metanetwork.pth  layer_pe (L, H), token_pe (M, H)                     -> m2p.layer_embedding, m2p.token_embedding
                     transformer_layers.i.self_attn.in_proj_* (3H, H)     -> m2p.blocks.i.attn.qkv (rows q; k; v)
                     transformer_layers.i.self_attn.out_proj.*            -> m2p.blocks.i.attn.out
                     transformer_layers.i.linear1.*, linear2.*            -> m2p.blocks.i.mlp.0, mlp.2
                     transformer_layers.i.norm1.*, norm2.*                -> m2p.blocks.i.norm1, norm2
    metalora.pth     {layer: {"attention": {"q"|"k"|"v"|"o": {"A" (1, I, R), "B" (1, R, O), "C": None}},
                              "mlp": {"gate"|"up"|"down": ...}}}          -> meta_lora.layers.l.<module>.A (I, R), .B

Their M2P blocks are torch.nn.TransformerEncoderLayer(post-LN, biases, exact GELU, LayerNorm eps 1e-5, dropout 0,
width 2H, 32 heads at H = 4096), alternating across layers (first) and across memory tokens, with no final
projection; the LoRA is read in mode "rl" (A row-major (I, r), B (r, O), modules q, k, v, o, gate, up, down) and
scaled by sqrt(1e-3) per factor; the memory tokens follow the left-padded context and their states are the decoder
layers' outputs. These are our defaults; `authors_config` spells them out, so the two forward passes are equal (their
position ids ignore the left padding, ours skip it: RoPE sees only relative positions, so the states agree).

    python convert.py --src Yewei-Liu/SHINE-ift_mqa_1qa --model Qwen/Qwen3-8B --out checkpoints/shine-ift_mqa_1qa

Conversion reads only the backbone's config (the LLM is built on the "meta" device), so it runs on any machine.
Files are read with `torch.load(weights_only=True)` only: a pickle that needs other Python objects is refused.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch
from torch import Tensor, nn

from shine import LLAMA_LINEARS, Shine, ShineConfig, decoder_layers, lora_shapes

AUTHOR_FILES = ("metanetwork.pth", "metalora.pth", "mem_tokens.pt")
EXTRA_META_LORA = "ift_additional_metalora.pth"  # only in their runs with ift_additional_metalora_r >= 0
OUR_FILES = ("shine_config.json", "hypernetwork.safetensors")
AUTHOR_MODULES = {"q_proj": ("attention", "q"), "k_proj": ("attention", "k"), "v_proj": ("attention", "v"),
                  "o_proj": ("attention", "o"), "gate_proj": ("mlp", "gate"), "up_proj": ("mlp", "up"),
                  "down_proj": ("mlp", "down")}
# a parameter of their TransformerEncoderLayer -> ours in an M2P block
BLOCK_NAMES = {"self_attn.in_proj_weight": "attn.qkv.weight", "self_attn.in_proj_bias": "attn.qkv.bias",
               "self_attn.out_proj.weight": "attn.out.weight", "self_attn.out_proj.bias": "attn.out.bias",
               "linear1.weight": "mlp.0.weight", "linear1.bias": "mlp.0.bias",
               "linear2.weight": "mlp.2.weight", "linear2.bias": "mlp.2.bias",
               "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
               "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias"}


class CheckpointError(ValueError):
    """A file that is not a readable authors' checkpoint for this backbone."""


# ----------------------------------------------------------------------------- reading their files
def load_weights_only(path: Path):
    """torch.load restricted to tensors and plain containers; a file needing other objects is refused."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; the authors' checkpoint folder holds {', '.join(AUTHOR_FILES)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise CheckpointError(f"cannot read {path}: truncated or corrupted ({error})") from error
        reason = str(error).split("WeightsUnpickler error:")[-1].strip().split(". Please")[0]
        raise CheckpointError(
            f"refusing {path}: it pickles Python objects besides tensors and dicts ({reason}). This converter only "
            "loads with torch.load(weights_only=True), because unpickling arbitrary objects can run code. The "
            "released SHINE files need nothing else; if you trust this file, re-save its tensors as a plain dict."
        ) from error
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as error:
        raise CheckpointError(f"cannot read {path}: truncated, corrupted or not a torch.save file ({error})") from error


def resolve_source(src: str | Path) -> Path:
    """A local folder as is; otherwise a Hugging Face hub repo id, downloaded once into the hub cache."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(src).count("/") != 1 or str(src).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{src} is neither a checkpoint folder nor a hub repo id like Yewei-Liu/SHINE-ift_mqa")
    from huggingface_hub import snapshot_download  # a dependency of transformers

    try:
        return Path(snapshot_download(repo_id=str(src), allow_patterns=["*.pth", "*.pt", "*.json", "*.safetensors"]))
    except Exception as error:  # offline, unknown repo, gated, ...: say what to do instead
        raise ConnectionError(
            f"no local folder {src}, and could not download it from the Hugging Face hub ({type(error).__name__}: "
            f"{error}). Without internet, fetch it elsewhere (`hf download {src} --local-dir DIR`) and pass the folder."
        ) from error


def read_authors_files(folder: Path) -> tuple[dict, dict, Tensor, dict | None]:
    """(metanetwork state dict, metalora nested dict, mem_tokens (M, H), optional extra IFT metalora)."""
    metanetwork, metalora, mem_tokens = (load_weights_only(folder / name) for name in AUTHOR_FILES)
    extra = load_weights_only(folder / EXTRA_META_LORA) if (folder / EXTRA_META_LORA).is_file() else None
    if not isinstance(metanetwork, dict):
        raise CheckpointError(f"{folder / 'metanetwork.pth'} holds a {type(metanetwork).__name__}, not a state dict")
    if not isinstance(metalora, dict):
        raise CheckpointError(f"{folder / 'metalora.pth'} holds a {type(metalora).__name__}, not a nested dict")
    if not isinstance(mem_tokens, Tensor) or mem_tokens.dim() != 2:
        raise CheckpointError(f"{folder / 'mem_tokens.pt'} should hold one (M, H) tensor")
    return metanetwork, metalora, mem_tokens.detach(), extra


def m2p_depth(metanetwork: dict) -> int:
    """Number of M2P blocks, after checking the key set is exactly the released layout."""
    depth = sum(f"transformer_layers.{i}.linear1.weight" in metanetwork for i in range(len(metanetwork)))
    expected = {"layer_pe", "token_pe"} | {f"transformer_layers.{i}.{n}" for i in range(depth) for n in BLOCK_NAMES}
    missing, extra = sorted(expected - metanetwork.keys()), sorted(metanetwork.keys() - expected)
    if depth and not (missing or extra):
        return depth
    hint = ""
    if any(k.startswith(("rmsnorm", "scale", "bias")) for k in extra) or any(k.endswith("bias") for k in missing):
        hint = (" It looks like an early version of their M2P (pre-LN, no biases, final RMSNorm with scale and bias),"
                " which the released checkpoints do not use and shine.py does not implement.")
    elif any(k.startswith("couple_layers") for k in extra):
        hint = " Their optional 'couple' layers (couple_num_layers > 0) are not supported."
    raise CheckpointError(f"metanetwork.pth is not the released SHINE M2P layout: missing {missing[:4]}, "
                          f"unexpected {extra[:4]}.{hint}")


def meta_lora_factors(metalora: dict, layer: int, module: str) -> tuple[Tensor, Tensor]:
    """Their A (1, I, R) and B (1, R, O) of one linear, as (I, R) and (R, O)."""
    group, short = AUTHOR_MODULES[module]
    try:
        entry = metalora[layer][group][short]
        A, B = entry["A"], entry["B"]
    except (KeyError, TypeError, IndexError) as error:
        raise CheckpointError(f"metalora.pth has no [{layer}][{group!r}][{short!r}]['A'/'B'] (missing {error})"
                              ) from error
    if entry.get("C") is not None:
        raise CheckpointError(f"metalora.pth has a bias term C for layer {layer} {module}; shine.py's LoRA has none")
    if A.dim() == 3 and B.dim() == 3 and A.shape[0] == B.shape[0] == 1:  # their leading "shared by the batch" axis
        A, B = A[0], B[0]
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0]:
        raise CheckpointError(f"metalora.pth layer {layer} {module}: A {tuple(A.shape)}, B {tuple(B.shape)} are not "
                              "(1, I, R), (1, R, O)")
    return A.detach(), B.detach()


# ----------------------------------------------------------------------------- their layout -> ours
def authors_config(metanetwork: dict, metaloras: list[dict], mem_tokens: Tensor, llm: nn.Module,
                   m2p_heads: int | None = None) -> ShineConfig:
    """The ShineConfig that makes our forward pass equal theirs, read off the tensors and checked against llm.

    The rank r comes from M = r D / H (their code requires it to divide exactly); the M2P head count is not stored
    in the files: None takes our default, head dim 128, which is their 32 heads at H = 4096.
    """
    shapes = lora_shapes(llm, LLAMA_LINEARS)
    hidden, D = llm.get_input_embeddings().embedding_dim, sum(i + o for i, o in shapes.values())
    M, width = mem_tokens.shape
    if width != hidden or (M * hidden) % D:
        raise CheckpointError(f"mem_tokens.pt is ({M}, {width}); this backbone (H = {hidden}, D = {D}) needs "
                              f"(M, {hidden}) with M * H a multiple of D. Wrong backbone for this checkpoint?")
    depth = m2p_depth(metanetwork)
    mlp_width = metanetwork["transformer_layers.0.linear1.weight"].shape[0]
    meta_rank = sum(meta_lora_factors(m, 0, "q_proj")[0].shape[1] for m in metaloras)
    return ShineConfig(lora_rank=M * hidden // D, meta_lora_rank=meta_rank, m2p_layers=depth, m2p_heads=m2p_heads,
                       m2p_mlp_ratio=mlp_width / hidden, m2p_first="column", m2p_norm_eps=1e-5,
                       target_modules=LLAMA_LINEARS, lora_scale=1e-3, reshape_mode="rl")


def authors_state(metanetwork: dict, metaloras: list[dict], mem_tokens: Tensor,
                  num_layers: int) -> dict[str, tuple[str, Tensor]]:
    """Our hypernetwork parameter name -> (their name, tensor). metaloras: metalora.pth, then any extra IFT one."""
    state = {"memory": ("mem_tokens.pt", mem_tokens),
             "m2p.layer_embedding": ("layer_pe", metanetwork["layer_pe"]),
             "m2p.token_embedding": ("token_pe", metanetwork["token_pe"])}
    for key, value in metanetwork.items():
        if key.startswith("transformer_layers."):
            _, i, rest = key.split(".", 2)
            state[f"m2p.blocks.{i}.{BLOCK_NAMES[rest]}"] = (key, value)
    for metalora in metaloras:
        if set(metalora) != set(range(num_layers)):
            raise CheckpointError(f"metalora.pth covers layers {sorted(metalora, key=str)[:4]}... ({len(metalora)}), "
                                  f"this backbone has {num_layers} decoder layers")
    for layer in range(num_layers):
        for module, (group, short) in AUTHOR_MODULES.items():
            # an extra IFT Meta-LoRA is merged the way they merge it: concatenated along the rank (a sum of LoRAs)
            pairs = [meta_lora_factors(m, layer, module) for m in metaloras]
            A, B = torch.cat([a for a, _ in pairs], dim=1), torch.cat([b for _, b in pairs], dim=0)
            where = f"metalora.pth[{layer}][{group}][{short}]"
            state[f"meta_lora.layers.{layer}.{module}.A"] = (f"{where}['A']", A)
            state[f"meta_lora.layers.{layer}.{module}.B"] = (f"{where}['B']", B)
    return state


@torch.no_grad()
def load_authors_state(shine: Shine, state: dict[str, tuple[str, Tensor]]) -> None:
    """Copy the converted tensors in, after checking every name and shape against this backbone's SHINE."""
    if shine.memory.is_meta:  # backbone built on "meta" (conversion from its config only): make the hypernetwork real
        shine.m2p.to_empty(device="cpu")
        shine.meta_lora.to_empty(device="cpu")
        shine.memory = nn.Parameter(torch.empty(shine.memory.shape))
    params = shine.hypernetwork_state_dict()
    if params.keys() != state.keys():
        missing, extra = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
        raise CheckpointError(f"converted names do not match shine.py: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, p in params.items():
        theirs, tensor = state[name]
        if tensor.shape != p.shape:
            raise CheckpointError(f"{theirs} has shape {tuple(tensor.shape)}; this backbone needs {tuple(p.shape)} "
                                  f"(for {name}). Wrong backbone, or a truncated/edited file?")
        p.copy_(tensor)


def convert_authors_checkpoint(src: str | Path, llm: nn.Module, m2p_heads: int | None = None) -> Shine:
    """Their checkpoint folder (or hub repo id) on `llm` -> a Shine whose generated LoRAs equal theirs."""
    folder = resolve_source(src)
    metanetwork, metalora, mem_tokens, extra = read_authors_files(folder)
    metaloras = [metalora] if extra is None else [metalora, extra]
    if extra is not None:
        print(f"{folder.name}: merging {EXTRA_META_LORA} into the Meta-LoRA (rank concatenation, as their loader)")
    config = authors_config(metanetwork, metaloras, mem_tokens, llm, m2p_heads)
    shine = Shine(llm, config)
    load_authors_state(shine, authors_state(metanetwork, metaloras, mem_tokens, len(decoder_layers(llm))))
    return shine


def is_authors_checkpoint(folder: Path) -> bool:
    return (folder / "metanetwork.pth").is_file()


def load_any_checkpoint(llm: nn.Module, path: str | Path, m2p_heads: int | None = None) -> Shine:
    """For evaluate.py's --shine-ckpt: our folder, the authors' folder, or a hub repo id of either."""
    folder = resolve_source(path)
    if all((folder / name).is_file() for name in OUR_FILES):
        return Shine.from_pretrained(llm, folder)
    if is_authors_checkpoint(folder):
        return convert_authors_checkpoint(folder, llm, m2p_heads)
    raise FileNotFoundError(f"{folder} holds neither our checkpoint ({', '.join(OUR_FILES)}) nor the authors' "
                            f"({', '.join(AUTHOR_FILES)})")


# ----------------------------------------------------------------------------- command line
def backbone_skeleton(model: str) -> nn.Module:
    """The backbone built from its config on the "meta" device: shapes only, no weights downloaded or allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model)
    except OSError as error:
        raise ConnectionError(f"cannot read the config of {model} (offline? pass a local model folder): {error}"
                              ) from error
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="authors' checkpoint folder or hub id (Yewei-Liu/SHINE-ift_mqa)")
    parser.add_argument("--model", required=True, help="backbone the checkpoint was trained on, e.g. Qwen/Qwen3-8B")
    parser.add_argument("--out", required=True, help="folder to write shine_config.json + hypernetwork.safetensors")
    parser.add_argument("--m2p-heads", type=int, default=None, help="M2P attention heads (default: hidden / 128)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    shine = convert_authors_checkpoint(args.src, backbone_skeleton(args.model), args.m2p_heads)
    out = shine.save_hypernetwork(args.out)
    c, report = shine.config, shine.parameter_report()
    print(f"converted {args.src} for {args.model}: r={c.lora_rank}, M={shine.num_memory}, Meta-LoRA rank "
          f"{c.meta_lora_rank}, {c.m2p_layers} M2P blocks; {report['total'] / 1e6:.1f}M parameters -> {out}")
    return out


if __name__ == "__main__":
    main()
