"""Tiny Hugging Face backbones built from a config (random weights, no download), fixed seeds."""
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))  # the scripts (train.py, evaluate.py, flops.py, data.py) live at the root


def tiny_qwen3(seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = 128, init_range: float = 0.02):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=512,
        tie_word_embeddings=True, initializer_range=init_range,
    )
    return Qwen3ForCausalLM(config).eval()


def tiny_llama(seed: int = 0, layers: int = 3, hidden: int = 48, vocab: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def qwen():
    return tiny_qwen3()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA} (they sit beside the repo in the dev setup)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    """A directory with a tiny Qwen3 (random weights) and a small BPE tokenizer carrying Qwen3's chat template,
    loadable by data.load_backbone like any local model."""
    from test_data import chat_tokenizer

    tokenizer = chat_tokenizer("qwen3")
    model = tiny_qwen3(vocab=len(tokenizer), init_range=0.2)  # peaked enough to learn on
    directory = tmp_path_factory.mktemp("tiny-qwen3")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
