"""convert.py: the authors' checkpoint layout (MuLabPKU/SHINE) converts into shine.py and gives their LoRAs.

The authors' files are built here at a tiny size from their documented layout (nn.TransformerEncoderLayer state
dicts, a nested Meta-LoRA dict, an (M, H) memory Parameter), and their forward pass is re-computed from their
equations, independently of shine.py: Meta-LoRA hooks x @ A @ B, memory tokens appended after the context, decoder
layer outputs, M2P of TransformerEncoderLayers alternating across layers / tokens, and the flat "rl" cut.
"""
import math
import pathlib
from collections import OrderedDict

import pytest
import torch
from conftest import tiny_qwen3
from torch import nn

import convert
from shine import Shine

RANK, META_RANK, HEADS, DEPTH = 2, 3, 4, 4  # tiny Qwen3: H = 64, D = 1024 -> M = r D / H = 32
MODULES = {"q_proj": ("attention", "q"), "k_proj": ("attention", "k"), "v_proj": ("attention", "v"),
           "o_proj": ("attention", "o"), "gate_proj": ("mlp", "gate"), "up_proj": ("mlp", "up"),
           "down_proj": ("mlp", "down")}


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) of a Qwen3 layer's linears, from the config (not from shine.py)."""
    H, hd, I = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
            "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}


def encoder_layer(hidden: int) -> nn.TransformerEncoderLayer:
    """One M2P block exactly as their config builds it (post-LN, biases, GELU, eps 1e-5)."""
    return nn.TransformerEncoderLayer(d_model=hidden, nhead=HEADS, dim_feedforward=2 * hidden, dropout=0.0,
                                      activation="gelu", layer_norm_eps=1e-5, batch_first=True, norm_first=False,
                                      bias=True)


def make_metalora(config, rank: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = linear_shapes(config)
    lora = {}
    for layer in range(config.num_hidden_layers):
        lora[layer] = {"attention": {}, "mlp": {}}
        for module, (group, short) in MODULES.items():
            i, o = shapes[module]
            A = (torch.randn(1, i, rank, generator=g) * 0.1).requires_grad_()  # saved as trainable leaves, like theirs
            B = (torch.randn(1, rank, o, generator=g) * 0.1).requires_grad_()
            lora[layer][group][short] = {"A": A, "B": B, "C": None}
    return lora


def make_authors_files(config, folder: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write metanetwork.pth, metalora.pth, mem_tokens.pt as their save_checkpoint does, with non-trivial values."""
    torch.manual_seed(seed)
    H, L = config.hidden_size, config.num_hidden_layers
    M = RANK * sum(i + o for i, o in linear_shapes(config).values()) // H
    blocks = [encoder_layer(H) for _ in range(DEPTH)]
    state = OrderedDict(layer_pe=torch.randn(L, H) * 0.5, token_pe=torch.randn(M, H) * 0.5)
    for i, block in enumerate(blocks):
        for name, tensor in block.state_dict().items():
            state[f"transformer_layers.{i}.{name}"] = tensor + 0.1 * torch.randn_like(tensor)  # no 0/1 defaults left
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "metanetwork.pth")
    torch.save(make_metalora(config, META_RANK, seed + 1), folder / "metalora.pth")
    torch.save(nn.Parameter(torch.randn(M, H)), folder / "mem_tokens.pt")
    return folder


def their_block_state(state: dict, i: int) -> dict:
    return {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"transformer_layers.{i}.")}


@torch.no_grad()
def authors_lora(llm, folder: pathlib.Path, context_ids, context_mask=None, scale: float = 1e-3):
    """Their forward pass, from their equations: {layer: {module: (A (b, I, r), B (b, r, O))}}."""
    state = torch.load(folder / "metanetwork.pth", weights_only=True)
    metaloras = [torch.load(folder / "metalora.pth", weights_only=True)]
    if (folder / "ift_additional_metalora.pth").is_file():
        metaloras.append(torch.load(folder / "ift_additional_metalora.pth", weights_only=True))
    memory = torch.load(folder / "mem_tokens.pt", weights_only=True)
    config, (M, H) = llm.config, memory.shape
    L, b = config.num_hidden_layers, context_ids.shape[0]
    # 1. the LLM reads [context, memory tokens] with every Meta-LoRA on: y = x W^T + x A B
    handles, states = [], [None] * L
    for l, layer in enumerate(llm.model.layers):
        for module, (group, short) in MODULES.items():
            linear = layer.get_submodule(("self_attn." if group == "attention" else "mlp.") + module)
            for lora in metaloras:
                A, B = lora[l][group][short]["A"][0], lora[l][group][short]["B"][0]
                handles.append(linear.register_forward_hook(lambda m, i, o, A=A, B=B: o + i[0] @ A @ B))
        grab = lambda m, i, o, l=l: states.__setitem__(l, (o[0] if isinstance(o, tuple) else o)[:, -M:])
        handles.append(layer.register_forward_hook(grab))
    mask = torch.ones_like(context_ids) if context_mask is None else context_mask
    embeds = torch.cat([llm.model.embed_tokens(context_ids), memory.expand(b, M, H)], dim=1)
    llm.model(inputs_embeds=embeds, attention_mask=torch.cat([mask, torch.ones(b, M, dtype=mask.dtype)], 1))
    for handle in handles:
        handle.remove()
    x = torch.stack(states, dim=1)  # (b, L, M, H)
    # 2. M2P: positional embeddings, then blocks across layers (even) and across memory tokens (odd)
    x = x + state["layer_pe"][None, :, None] + state["token_pe"][None, None]
    for i in range(DEPTH):
        block = encoder_layer(H).eval()
        block.load_state_dict(their_block_state(state, i))
        if i % 2 == 0:
            x = block(x.transpose(1, 2).flatten(0, 1)).unflatten(0, (b, M)).transpose(1, 2)
        else:
            x = block(x.flatten(0, 1)).unflatten(0, (b, L))
    flat = x.flatten(1)
    # 3. "rl" cut of the flat vector, layer after layer, module after module, A (I, r) then B (r, O)
    r = M * H // sum(i + o for i, o in linear_shapes(config).values())
    lora, t = {}, 0
    for l in range(L):
        lora[l] = {}
        for module, (i, o) in linear_shapes(config).items():
            A = flat[:, t:t + i * r].reshape(b, i, r) * math.sqrt(scale)
            t += i * r
            B = flat[:, t:t + r * o].reshape(b, r, o) * math.sqrt(scale)
            t += r * o
            lora[l][module] = (A, B)
    assert t == flat.shape[1]
    return lora


def assert_same_lora(ours, theirs, atol=1e-6):
    assert sorted(ours) == sorted(theirs)
    for l in theirs:
        assert list(ours[l]) == list(theirs[l])
        for module, (A, B) in theirs[l].items():
            torch.testing.assert_close(ours[l][module][0], A, rtol=1e-4, atol=atol)
            torch.testing.assert_close(ours[l][module][1], B, rtol=1e-4, atol=atol)


@pytest.fixture
def authors_dir(tmp_path, qwen):
    return make_authors_files(qwen.config, tmp_path / "authors")


def context(vocab: int, b: int = 2, n: int = 9, seed: int = 1):
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


def test_converted_checkpoint_generates_the_authors_lora(qwen, authors_dir):
    shine = convert.convert_authors_checkpoint(authors_dir, qwen, m2p_heads=HEADS)
    c = shine.config
    assert (c.lora_rank, c.meta_lora_rank, c.m2p_layers, shine.num_memory) == (RANK, META_RANK, DEPTH, 32)
    ids = context(qwen.config.vocab_size)
    with torch.no_grad():
        ours = shine.generate_lora(ids, torch.ones_like(ids))
    theirs = authors_lora(qwen, authors_dir, ids)
    assert theirs[1]["down_proj"][1].abs().max() > 1e-3  # a real signal, not zeros on both sides
    assert_same_lora(ours, theirs)


def test_m2p_equals_their_encoder_layers(qwen, authors_dir):
    """M2P alone on random memory states, against their alternating TransformerEncoderLayer stack."""
    shine = convert.convert_authors_checkpoint(authors_dir, qwen, m2p_heads=HEADS)
    state = torch.load(authors_dir / "metanetwork.pth", weights_only=True)
    states = torch.randn(3, 2, 32, 64)
    x = states + state["layer_pe"][None, :, None] + state["token_pe"][None, None]
    for i in range(DEPTH):
        block = encoder_layer(64).eval()
        block.load_state_dict(their_block_state(state, i))
        x = (block(x.transpose(1, 2).flatten(0, 1)).unflatten(0, (3, 32)).transpose(1, 2) if i % 2 == 0
             else block(x.flatten(0, 1)).unflatten(0, (3, 2)))
    with torch.no_grad():
        torch.testing.assert_close(shine.m2p(states), x, rtol=1e-5, atol=1e-5)


def test_left_padded_context_matches_their_padding(qwen, authors_dir):
    """They left-pad to a fixed length and keep positions 0..T+M-1; we count positions from the mask. RoPE only
    sees relative positions, so the LoRAs agree."""
    shine = convert.convert_authors_checkpoint(authors_dir, qwen, m2p_heads=HEADS)
    ids = context(qwen.config.vocab_size, n=11)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # row 0 is a 7-token context padded on the left
    with torch.no_grad():
        ours = shine.generate_lora(ids, mask)
    assert_same_lora(ours, authors_lora(qwen, authors_dir, ids, mask), atol=1e-5)


def test_extra_ift_metalora_is_merged_along_the_rank(qwen, authors_dir):
    torch.save(make_metalora(qwen.config, 2, seed=7), authors_dir / "ift_additional_metalora.pth")
    shine = convert.convert_authors_checkpoint(authors_dir, qwen, m2p_heads=HEADS)
    assert shine.config.meta_lora_rank == META_RANK + 2
    ids = context(qwen.config.vocab_size)
    with torch.no_grad():
        ours = shine.generate_lora(ids, torch.ones_like(ids))
    assert_same_lora(ours, authors_lora(qwen, authors_dir, ids))


def test_cli_writes_our_format_and_both_formats_load(qwen, authors_dir, tmp_path):
    """The CLI needs only the backbone's config (meta device); its output and their folder load alike."""
    qwen.save_pretrained(tmp_path / "backbone")
    out = convert.main(["--src", str(authors_dir), "--model", str(tmp_path / "backbone"), "--out",
                        str(tmp_path / "ours"), "--m2p-heads", str(HEADS)])
    assert {p.name for p in out.iterdir()} == {"shine_config.json", "hypernetwork.safetensors"}
    ids = context(qwen.config.vocab_size)
    theirs = authors_lora(qwen, authors_dir, ids)
    for shine in (Shine.from_pretrained(qwen, out), convert.load_any_checkpoint(qwen, out),
                  convert.load_any_checkpoint(qwen, authors_dir, m2p_heads=HEADS)):
        with torch.no_grad():
            assert_same_lora(shine.generate_lora(ids, torch.ones_like(ids)), theirs)


def _edit(folder: pathlib.Path, file: str, change) -> None:
    data = torch.load(folder / file, weights_only=True)
    data = change(data)
    torch.save(data, folder / file)


def _drop(state, key):
    del state[key]
    return state


def _old_m2p(state):  # their early M2P: no biases, a final RMSNorm with scale and bias
    state = OrderedDict((k, v) for k, v in state.items() if not k.endswith("bias"))
    state.update({"rmsnorm.weight": torch.ones(64), "scale": torch.ones(1, 2, 32, 1), "bias": torch.zeros(1, 2, 32, 1)})
    return state


@pytest.mark.parametrize("file, change, message", [
    ("metanetwork.pth", lambda s: {**s, "layer_pe": torch.zeros(3, 64)}, r"layer_pe has shape \(3, 64\)"),
    ("metanetwork.pth", lambda s: {**s, "transformer_layers.0.self_attn.in_proj_weight": torch.zeros(96, 64)},
     r"in_proj_weight has shape \(96, 64\); this backbone needs \(192, 64\)"),
    ("metanetwork.pth", lambda s: _drop(s, "transformer_layers.3.norm2.bias"), "missing.*norm2.bias"),
    ("metanetwork.pth", _old_m2p, "early version of their M2P"),
    ("mem_tokens.pt", lambda t: torch.zeros(30, 64), r"mem_tokens.pt is \(30, 64\)"),
    ("metalora.pth", lambda d: {0: d[0]}, "covers layers"),
    ("metalora.pth", lambda d: {0: d[0], 1: {"attention": d[1]["attention"]}}, r"no \[1\]\['mlp'\]\['gate'\]"),
])
def test_wrong_file_gets_a_clear_error(qwen, authors_dir, file, change, message):
    _edit(authors_dir, file, change)
    with pytest.raises(convert.CheckpointError, match=message):
        convert.convert_authors_checkpoint(authors_dir, qwen, m2p_heads=HEADS)


def test_wrong_backbone_gets_a_clear_error(authors_dir):
    with pytest.raises(convert.CheckpointError, match="covers layers"):
        convert.convert_authors_checkpoint(authors_dir, tiny_qwen3(layers=3), m2p_heads=HEADS)
    with pytest.raises(convert.CheckpointError, match="Wrong backbone"):
        convert.convert_authors_checkpoint(authors_dir, tiny_qwen3(hidden=48), m2p_heads=HEADS)


def test_truncated_or_missing_file_gets_a_clear_error(qwen, authors_dir):
    data = (authors_dir / "metanetwork.pth").read_bytes()
    (authors_dir / "metanetwork.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(convert.CheckpointError, match="truncated"):
        convert.convert_authors_checkpoint(authors_dir, qwen)
    (authors_dir / "metanetwork.pth").unlink()
    with pytest.raises(FileNotFoundError, match="neither our checkpoint"):
        convert.load_any_checkpoint(qwen, authors_dir)


def _leave_mark(path):
    pathlib.Path(path).write_text("code ran while unpickling")


class Payload:
    """What a malicious checkpoint carries: unpickling it calls a function of the attacker's choice."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return _leave_mark, (str(self.path),)


def test_pickle_with_arbitrary_objects_is_refused(qwen, authors_dir, tmp_path):
    marker = tmp_path / "marker"
    _edit(authors_dir, "mem_tokens.pt", lambda t: {"tokens": t, "extra": Payload(marker)})
    with pytest.raises(convert.CheckpointError, match=r"refusing .*mem_tokens.pt.*weights_only=True"):
        convert.convert_authors_checkpoint(authors_dir, qwen)
    assert not marker.exists()
    torch.load(authors_dir / "mem_tokens.pt", weights_only=False)  # the file really runs code when fully unpickled
    assert marker.exists()


def test_hub_id_offline_fails_clearly(qwen, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConnectionError, match="hf download Yewei-Liu/SHINE-ift_mqa_1qa"):
        convert.load_any_checkpoint(qwen, "Yewei-Liu/SHINE-ift_mqa_1qa")
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder nor a hub repo id"):
        convert.load_any_checkpoint(qwen, tmp_path / "no" / "such" / "folder")
