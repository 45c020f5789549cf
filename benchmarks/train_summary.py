"""Throughput of train.py runs from their log.jsonl files: median step time, tokens/s, model TFLOP/s, MFU and
peak memory per GPU (train.py logs the last three on CUDA, from flops.py's training count).

    python benchmarks/train_summary.py runs/8b/pretrain runs/8b/ift-mqa ... --out results/train_h100.json

The first `--skip` steps (CUDA warm-up, allocator growth) are left out of the medians.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train import latest_checkpoint  # noqa: E402

FIELDS = ("ms", "tok_s", "tflops", "mfu", "peak_gib")


def summarise(run: Path, skip: int) -> dict:
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    latest = latest_checkpoint(run)
    config = json.loads((latest / "train_config.json").read_text()) if latest else {}
    timed = log[skip:] or log
    row = {"run": str(run), "steps": len(log), "timed_steps": len(timed), "model": config.get("model"),
           "stage": config.get("stage"), "batch": config.get("batch_size"), "grad_accum": config.get("grad_accum"),
           "fsdp": config.get("fsdp"), "compile": config.get("compile"), "gpus": log[-1].get("gpus")}
    for field in FIELDS:
        values = [r[field] for r in timed if field in r]
        row[field] = statistics.median(values) if values else None
    peaks = [r["peak_gib"] for r in log if "peak_gib" in r]
    row["peak_gib"] = max(peaks) if peaks else None  # the peak over the run, not a median
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="train.py --out-dir folders")
    p.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the medians")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rows = [summarise(run, args.skip) for run in args.runs]
    print(f"{'run':40} {'steps':>5} {'ms/step':>8} {'tok/s':>8} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}")
    fmt = lambda v, spec: format(v, spec) if v is not None else format("-", ">" + spec.rstrip("f%").split(".")[0])
    for r in rows:
        print(f"{r['run'][-40:]:40} {r['steps']:>5} {fmt(r['ms'], '8.0f')} {fmt(r['tok_s'], '8.0f')} "
              f"{fmt(r['tflops'], '8.1f')} {fmt(r['mfu'], '6.1%')} {fmt(r['peak_gib'], '8.1f')}")
    if args.out:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"  # recorded with the numbers
        args.out.write_text(json.dumps({"device": device, "runs": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
