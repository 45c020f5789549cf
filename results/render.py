"""The README's results tables, regenerated from the JSON in results/ (never typed by hand).

    python results/render.py            # rewrite README.md between <!-- results:start --> and <!-- results:end -->
    python results/render.py --check    # exit 1 if README.md is out of date with results/

Reads results/shine-135m/: {squad,hotpotqa,musique,2wiki}.json and coqa-heldout.json (evaluate.py reports),
recon_curves.json (benchmarks/recon_curves.py), training.json (benchmarks/shine_135m.py package),
channel_probe.json (benchmarks/channel_probe.py runs and recipe trials),
results/train_*.json (benchmarks/train_summary.py) and results/speed*.json (benchmarks/speed.py). Missing files are
skipped.
"""
import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
START, END = "<!-- results:start -->", "<!-- results:end -->"
BENCHES = {"squad": "SQuAD", "hotpotqa": "HotpotQA", "musique": "MuSiQue", "2wiki": "2WikiMultihopQA"}
METHODS = {"naive": "Naive", "in-context": "In-context", "sft": "SFT", "shine": "SHINE",
           "shine-other": "SHINE, another context's LoRA"}
CONTROL = "shine-other"  # a control, not a method: its own table (control_table), not a row of Table 2
STAGE_NAMES = {"pretrain": "pretraining", "ift-mqa": "IFT multi-QA", "ift-1qa": "IFT single-QA"}


def load(directory: Path) -> dict[str, dict]:
    """Every results JSON of a directory by file stem."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def table2(results: dict[str, dict]) -> str | None:
    """Table 2 analogue: answer F1 / EM of each method on each benchmark."""
    benches = [b for b in BENCHES if b in results]
    if not benches:
        return None
    methods = [m for m in METHODS if m != CONTROL and any(m in results[b]["results"] for b in benches)]
    cell = lambda r: f"{r['f1']:.1f} / {r['em']:.1f}" if r else "–"
    rows = [[METHODS[m]] + [cell(results[b]["results"].get(m)) for b in benches] for m in methods]
    gain = lambda r: f"{r['shine']['f1'] - r['naive']['f1']:+.1f}" if {"shine", "naive"} <= r.keys() else "–"
    if "shine" in methods and "naive" in methods:
        rows.append(["SHINE − naive (F1)"] + [gain(results[b]["results"]) for b in benches])
    header = ["method"] + [f"{BENCHES[b]} (n={results[b]['n']})" for b in benches]
    return "**Table 2 analogue**: answer F1 / EM (official SQuAD scorer; HotpotQA's yes/no rule on HotpotQA and 2Wiki).\n\n" + markdown_table(header, rows)


def control_table(results: dict[str, dict]) -> str | None:
    """SHINE with its own context's LoRA against another context's (evaluate.py's shine-other): Table 2's files."""
    reports = {b: results[b] for b in BENCHES if CONTROL in results.get(b, {}).get("results", {})}
    rows = []
    for bench, report in reports.items():
        own, other = report["results"]["shine"], report["results"][CONTROL]
        same = sum(a["answer"] == b["answer"] for a, b in zip(own["predictions"], other["predictions"]))
        rows.append([f"{BENCHES[bench]} (n={report['n']})", f"{own['f1']:.1f} / {own['em']:.1f}",
                     f"{other['f1']:.1f} / {other['em']:.1f}", f"{own['f1'] - other['f1']:+.1f}",
                     f"{same / len(own['predictions']):.0%}"])
    if not rows:
        return None
    machine = machine_of(next(iter(reports.values())), "shine")
    # evaluate.py runs the backbone in bf16 on a GPU, in float32 on a CPU
    where = f"{machine_name(machine)}, {'bf16' if machine.get('gpu') else 'float32'}"
    return ("**Does SHINE read the context?** The same questions answered with the LoRA of their own context and "
            f"with another record's (`evaluate.py --method shine,shine-other`, one run on {where}).\n\n"
            + markdown_table(["bench", "own context F1 / EM", "another context F1 / EM", "F1 own − other",
                              "identical answers"], rows))


def machine_of(report: dict, method: str) -> dict:
    """The machine a method ran on: its own record, else the report's (files written before methods kept one)."""
    return report["results"][method].get("machine") or report.get("machine", {})


def machine_name(machine: dict) -> str:
    cores = f" ({machine['cpu_count']} cores)" if machine.get("cpu_count") else ""
    return machine.get("gpu") or machine.get("cpu", "?") + cores


def table1(report: dict | None) -> str | None:
    """Table 1 analogue: F1 on held-out multi-turn conversations with amortizable and generation time."""
    if report is None:
        return None
    results = {m: report["results"][m] for m in METHODS if m in report["results"]}
    machines = {m: machine_name(machine_of(report, m)) for m in results}
    rows = [[METHODS[m], f"{r['f1']:.1f}", f"{r['em']:.1f}", f"{r['amortizable_s']:.3f}", f"{r['generation_s']:.3f}"]
            for m, r in results.items()]
    header, where = ["method", "F1", "EM", "amortizable s", "generation s"], next(iter(machines.values()), "?")
    if len(set(machines.values())) > 1:  # methods merged from runs on several machines: times compare within one
        header, where = header + ["machine"], "the machine of each row (times compare only within one machine)"
        rows = [row + [machines[m]] for row, m in zip(rows, results)]
    return (f"**Table 1 analogue**: {report['n']} held-out CoQA conversations, every turn answered after the "
            f"model's own earlier replies; seconds per conversation on {where}, batch {report['config']['batch_size']}.\n\n"
            + markdown_table(header, rows))


def curves_table(curves: dict | None) -> str | None:
    """Figure 5 analogue in numbers: median PPL [P10, P90] per text-length bucket, per model and task."""
    if curves is None:
        return None
    edges = curves["config"]["buckets"]
    rows = []
    for name, tasks in curves["summary"].items():
        for task, s in tasks.items():
            ppl = s["ppl"]
            rows.append([name, {"recon": "reconstruction", "comp": "completion", "recon_other": "reconstruction, other text's LoRA"}[task]] + [
                f"{m:.2f} [{lo:.2f}, {hi:.2f}]" if m is not None else "–"
                for m, lo, hi in zip(ppl["median"], ppl["p10"], ppl["p90"])])
    n = curves["summary"][next(iter(curves["summary"]))]["recon"]["n"]
    header = ["model", "task"] + [f"{a}–{b} tokens (n={k})" for a, b, k in zip(edges, edges[1:], n)]
    return ("**Figure 5 analogue**: perplexity of the held-out WikiText-2 text under the generated LoRA, median "
            "[P10, P90] by text length; base = the backbone without any LoRA.\n\n" + markdown_table(header, rows))


def training_table(training: dict | None) -> str | None:
    if training is None:
        return None
    p = training["parameters"]
    held_out = lambda s: ", ".join(f"{k[4:-5]} {v:.3f}" for k, v in s.items() if k.startswith("val_") and k.endswith("_loss"))
    rows = [[STAGE_NAMES.get(s["stage"], s["stage"]), str(s["steps"]), str(s["batch"]), f"{s['lr']:g}",
             f"{s['minutes']:.1f}", f"{s['first_loss']:.3f} → {s['last_loss']:.3f}", held_out(s) or "–"]
            for s in training["stages"]]
    return (f"**Training**: {p['total']:,} trained parameters ({p['memory']:,} memory embeddings, {p['meta_lora']:,} "
            f"Meta-LoRA, {p['m2p']:,} M2P), {training['bytes'] / 1e6:.1f} MB in bf16.\n\n"
            + markdown_table(["stage", "steps", "batch", "peak lr", "training minutes", "train loss", "held-out loss"], rows))


def probe_rows(runs: dict) -> tuple[list[int], list[list[str]]]:
    """channel_probe.py runs side by side: the channel every 100 steps (the last six marks), the last step's losses."""
    steps = sorted(set.intersection(*({p["step"] for p in r["curve"]} for r in runs.values())) - {0})
    marks = [s for s in steps if s % 100 == 0][-6:]
    rows = []
    for name, r in runs.items():
        at = {p["step"]: p for p in r["curve"]}
        last = r["curve"][-1]
        rows.append([name, f"{r['config']['lr']:g}", *(f"{at[s]['channel']:+.3f}" for s in marks),
                     f"{last['step']}", f"{last['own']:.3f} / {last['other']:.3f} / {last['none']:.3f}"])
    return marks, rows


def scale_text(s: float) -> str:
    """A LoRA scale as the README writes it: 2.7e-4."""
    return f"{s:.1e}".replace("e-0", "e-")


def lever_table(levers: dict) -> str:
    """channel_probe.py runs that change one setting of the recipe's: the channel where each run stopped."""
    step = levers["compiled_pretrain_step"]
    per_batch = ", ".join(f"{r['ms']} ms at batch {b}" for b, r in step["by_batch"].items())
    rows = []
    for name, r in levers["runs"].items():
        c, last = r["config"], r["curve"][-1]
        rows.append([name, str(c["batch_size"]), f"{c['lr']:g}", str(c["lora_rank"]), scale_text(c["lora_scale"]),
                     str(c["seed"]), r["setting"], str(last["step"]), f"{last['channel']:+.3f}",
                     f"{last['own']:.3f} / {last['other']:.3f} / {last['none']:.3f}"])
    return ("**Levers for more channel per GPU minute**: the same probe with one setting changed; train.py's compiled "
            f"pretraining step ({step['device']}): {per_batch}." + note(levers) + "\n\n"
            + markdown_table(["run", "batch", "lr", "r", "s", "seed", "how", "last step", "channel", "own / other / none"],
                             rows))


def channel_tables(probe: dict | None) -> list[str]:
    """benchmarks/channel_probe.py by LoRA scale s and by memory_norm: how much of the held-out loss comes from the
    text's own LoRA; then the levers (batch, lr, rank r, scale s) and the recipe trials."""
    if probe is None:
        return []
    columns = lambda marks: ["lr", *(f"step {s}" for s in marks), "last step", "own / other / none"]
    marks, rows = probe_rows(probe["runs"])
    tables = [("**Is the context reaching the LoRA?** `benchmarks/channel_probe.py`: reconstruction-only training "
               "from scratch; held-out WikiText-2 loss under another text's LoRA minus under the text's own "
               "(nats per token, the channel), by the generated LoRA's scale s." + note(probe) + "\n\n")
              + markdown_table(["s", *columns(marks)], rows)]
    if norms := probe.get("memory_norm"):
        marks, rows = probe_rows(norms["runs"])
        tables.append("**The same channel by `memory_norm`**: what the M2P reads, raw memory states (the paper) or "
                      "each divided by its RMS or put through the backbone's own next norm (`shine.MEMORY_NORMS`)."
                      + note(norms) + "\n\n" + markdown_table(["memory_norm", *columns(marks)], rows))
    if levers := probe.get("levers"):
        tables.append(lever_table(levers))
    if trials := probe.get("trials"):
        fmt = lambda v, spec: format(v, spec) if v is not None else "–"
        rows = [[t["name"], scale_text(t["lora_scale"]), str(t["pretrain_context"]), f"{t['steps']} × {t['batch']}",
                 f"{t['val_recon_loss']:.3f} / {t['val_comp_loss']:.3f}", fmt(t["squad_shine_f1"], ".1f"), t["remark"]]
                for t in trials]
        tables.append("**Recipe trials** (`benchmarks/shine_135m.sh` stages, not shipped): held-out reconstruction "
                      "/ completion loss at the end of pretraining, SHINE's SQuAD F1 after the IFT stages.\n\n"
                      + markdown_table(["trial", "s", "pretraining context", "steps × batch", "recon / comp",
                                        "SQuAD F1", "remark"], rows))
    return tables


def speed_rows(report: dict, path: str = "") -> list[list[str]]:
    """benchmarks/speed.py's measurements (nested dicts whose leaves carry "ms"), one row each, as its print_table."""
    rows = []
    for key, value in report.items():
        name = f"{path}/{key}".lstrip("/")
        if isinstance(value, dict) and "ms" in value:
            rate = next((f"{value[k]:.4g} {k[:-2].replace('_', ' ')}/s" for k in ("contexts_s", "decode_tok_s", "tok_s")
                         if k in value), "–")
            if "scaling_efficiency" in value:  # FSDP: tok/s is per GPU; the scaling is against one GPU
                rate += f" per GPU, scaling {value['scaling_efficiency']:.0%}"
            cells = [f"{value[k]:{f}}" if k in value else "–" for k, f in
                     (("tflops", ".4g"), ("mfu", ".1%"), ("x_base", ".3f"), ("peak_gib", ".4g"))]
            rows.append([name, f"{value['ms']:.2f}", rate, *cells])
        elif isinstance(value, dict) and key != "lengths":
            rows += speed_rows(value, name)
    return rows


def note(report: dict) -> str:
    """A results file's "note" (what was measured when, against what) as an italic line under its table title."""
    return f"\n\n_{report['note']}._" if "note" in report else ""


def speed_tables(directory: Path) -> list[str]:
    tables = []
    for path in sorted(Path(directory).glob("speed*.json")):
        report = json.loads(path.read_text())
        if rows := speed_rows(report):
            header = ["measurement", "ms", "rate", "TFLOP/s", "MFU", "× base", "peak GiB"]
            sharded = f"; FSDP2 shards the {report['sharded']}" if "sharded" in report else ""
            tables.append(f"**Speed** (`{path.name}`: {report.get('device', '?')}, shape {report.get('shape', '?')}"
                          f"{sharded}){note(report)}\n\n" + markdown_table(header, rows))
    return tables


def train_tables(directory: Path) -> list[str]:
    """benchmarks/train_summary.py's reports (train.py runs at a model's shape): one row per stage."""
    tables = []
    for path in sorted(Path(directory).glob("train_*.json")):
        report = json.loads(path.read_text())
        fmt = lambda v, spec: format(v, spec) if v is not None else "–"
        gpus = lambda r: str(r.get("gpus") or 1) + (" (FSDP)" if r["fsdp"] else "")
        batch = lambda r: f"{r['batch']} × {r['grad_accum']}" if (r.get("grad_accum") or 1) > 1 else str(r["batch"])
        stage = lambda r: (r["stage"] or "?") + (f" (compiled: {r['compile']})" if r.get("compile") else "")
        rows = [[Path(r["model"] or "?").name, stage(r), gpus(r), batch(r), f"{r['timed_steps']} of {r['steps']}",
                 fmt(r["ms"], ".0f"), fmt(r["tok_s"], ".4g"), fmt(r["tflops"], ".4g"), fmt(r["mfu"], ".1%"),
                 fmt(r["peak_gib"], ".4g")] for r in report["runs"]]
        header = ["shape", "stage", "GPUs", "batch / GPU (× accumulated)", "steps timed", "ms / step",
                  "tok/s (all GPUs)", "TFLOP/s / GPU", "MFU", "peak GiB"]
        tables.append(f"**train.py** (`{path.name}`: {report['device']}; random weights, bundled data, medians)"
                      f"{note(report)}"
                      "\n\n" + markdown_table(header, rows))
    return tables


def render(results_dir: Path = HERE) -> str:
    shine = load(Path(results_dir) / "shine-135m")
    parts = [table2(shine), control_table(shine), table1(shine.get("coqa-heldout")), curves_table(shine.get("recon_curves")),
             training_table(shine.get("training")), *channel_tables(shine.get("channel_probe")),
             *train_tables(results_dir), *speed_tables(results_dir)]
    parts = [p for p in parts if p]
    return "\n\n".join(parts) if parts else "_No results yet: see benchmarks/shine_135m.sh._"


def update_readme(readme: Path, text: str) -> str | None:
    """README text with `text` between the markers, or None when the markers are missing."""
    old = readme.read_text() if readme.is_file() else ""
    if START not in old or END not in old.split(START, 1)[1]:
        return None
    head, rest = old.split(START, 1)
    return f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=HERE)
    p.add_argument("--readme", type=Path, default=HERE.parent / "README.md")
    p.add_argument("--check", action="store_true", help="only check that the README is up to date")
    args = p.parse_args(argv)
    text = render(args.results)
    new = update_readme(args.readme, text)
    if new is None:
        print(f"{args.readme} lacks the markers {START} / {END}; the tables:\n\n{text}")
        return 1 if args.check else 0
    if args.check:
        stale = new != args.readme.read_text()
        print(f"{args.readme} is {'out of date: run python results/render.py' if stale else 'up to date'}")
        return int(stale)
    args.readme.write_text(new)
    print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
