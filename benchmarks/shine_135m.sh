#!/usr/bin/env bash
# SHINE-135M (issue 7): the whole pipeline on SmolLM2-135M-Instruct, one subcommand per device call, each well
# under 9 minutes on one H100. Several subcommands in one call run in order.
#
#   bash benchmarks/shine_135m.sh timing      # ~20 steps of each stage: ms/step, *_STEPS for TIMING_MINUTES, parameters
#   bash benchmarks/shine_135m.sh pretrain    # then ift-mqa, ift-1qa: each starts from the previous stage
#   bash benchmarks/shine_135m.sh eval        # Table 2 (SQuAD, HotpotQA, MuSiQue, 2Wiki) and Table 1 (held-out CoQA)
#   bash benchmarks/shine_135m.sh curves      # Figure 5: reconstruction / completion on WikiText-2 test
#   bash benchmarks/shine_135m.sh package     # checkpoints/shine-smollm2-135m (bf16) + results/shine-135m/training.json
#
# Every variable below can be set in the environment (COMPILE= trains eager). Data: DATA_DIR holds SQuADShifts, CoQA
# and SQuAD dev, flat (.carry_data) or in subfolders (../shared/data). With $OUT set (the device machine), each
# training stage also returns its checkpoint in bf16, split into <= 15 MiB parts ($OUT/ckpt/<stage>/), and results go
# to $OUT/results/.
# On a fresh machine, a stage whose run is gone is restored from $CKPT_IN/<stage> (those parts, carried back).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PY:=python3}" "${MODEL:=smollm2-135m}" "${DATA_DIR:=.carry_data}" "${RUN:=runs/135m}" "${CKPT_IN:=.carry_ckpt}"
: "${RESULTS:=results/shine-135m}" "${PACKAGE_DIR:=checkpoints/shine-smollm2-135m}"
: "${META_RANK:=40}" "${LORA_SCALE:=2.7e-4}" "${MEMORY_NORM:=rms}" "${MAX_CONTEXT:=1150}" "${EVAL_EVERY:=100}" "${SAVE_EVERY:=200}" "${TRAIN_EXTRA:=}"
# the shipped checkpoint's recipe: 14.5 minutes of compiled training steps on one H200 (18.6 minutes of calls with
# loading, encoding and exports; each stage < 7). Compiling (train.py --compile, 20-60 s per stage) bought ~1.4x the
# steps per minute of the eager recipe before it (950 + 420 x 32 + 800 steps, 17.8 minutes on an H100).
: "${COMPILE=inductor}"  # "=" not ":=": an empty COMPILE= means eager
# LORA_SCALE 2.7e-4 rather than 2.7e-3 lets the context reach the LoRA ~4x faster (benchmarks/channel_probe.py);
# short pretraining texts buy more steps in the same minutes and cost nothing in held-out loss (README, trials);
# MEMORY_NORM rms: the M2P reads RMS-normalized memory states, the channel was 2.5x larger after 400 probe steps
: "${PRETRAIN_STEPS:=1000}" "${PRETRAIN_BATCH:=32}" "${PRETRAIN_LR:=5e-4}"  # lr 1e-3 diverged (at s = 2.7e-3)
: "${PRETRAIN_CONTEXT:=256}"  # texts are packed up to this many tokens (the fine-tuning stages: MAX_CONTEXT)
: "${MQA_STEPS:=450}" "${MQA_BATCH:=48}" "${MQA_LR:=3e-4}"        # 2.6 epochs of 8,297 conversations
: "${ONEQA_STEPS:=1050}" "${ONEQA_BATCH:=32}" "${ONEQA_LR:=2e-4}"  # 0.9 epoch of 37,604 questions; batch 64 ran OOM on an H100
: "${PART_SIZE:=15M}" "${HELDOUT:=50}" "${SQUAD_SAMPLE:=1000}" "${TIMING_STEPS:=20}" "${TIMING_MINUTES:=6,6.5,6.5}" "${RESUME:=}"
# Table 2's methods; a retrained checkpoint needs only TABLE2_METHODS=shine (and COQA_METHODS=shine) with MERGE=1
: "${TABLE2_METHODS:=naive,in-context,shine}"
: "${EVAL_BATCH:=16}" "${EVAL_LIMIT:=}" "${MAX_NEW_TOKENS:=32}" "${EVAL_EXTRA:=}" "${BENCHES:=squad hotpotqa musique 2wiki coqa}"
# CoQA's 50 conversations take ~4.5 minutes per baseline on an H100 (HF generate, turn by turn), more than one
# 10-minute call for all four methods: BENCHES=coqa COQA_METHODS=naive,in-context, then sft,shine with MERGE=1.
# MERGE=1 keeps the other methods' results already in $RESULTS (evaluate.py --merge checks they match)
: "${COQA_METHODS:=naive,in-context,sft,shine}" "${MERGE:=}"
: "${CURVE_PER_BUCKET:=64}" "${CURVE_BATCH:=16}" "${CURVE_BUCKETS:=64,128,256,512,1150}"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL="${TQDM_MININTERVAL:-30}"
DATA=${DATA:-$RUN/data}  # make_heldout.py's files; runs side by side can share one
SHIFTS=$(printf "$DATA/squadshifts_%s.json.gz," new_wiki nyt reddit amazon); SHIFTS=${SHIFTS%,}
if [ -n "${OUT:-}" ]; then  # a full log comes back too; the trap lets tee finish writing it
  exec > >(tee -a "$OUT/shine_135m.log") 2>&1
  trap 'exec >&- 2>&-; wait' EXIT
fi

prepare() {  # the training files and held-out sets, once per machine
  [ -f "$DATA/manifest.json" ] || $PY benchmarks/make_heldout.py --data-dir "$DATA_DIR" --out "$DATA" \
    --heldout "$HELDOUT" --squad-sample "$SQUAD_SAMPLE"
}

have() { [ -f "$RUN/$1/latest" ] || [ -f "$RUN/export/$1/shine_config.json" ] || [ -f "$CKPT_IN/$1/SHA256SUMS" ]; }

ckpt() {  # stage [bf16]: this machine's run (float32), else or with "bf16" its export (restored from parts if needed)
  local stage=$1
  if [ -f "$RUN/$stage/latest" ] && [ -z "${2:-}" ]; then echo "$RUN/$stage/$(cat "$RUN/$stage/latest")"; return; fi
  if [ ! -f "$RUN/export/$stage/shine_config.json" ] && [ -f "$CKPT_IN/$stage/SHA256SUMS" ]; then
    bash benchmarks/unpack_checkpoint.sh "$CKPT_IN/$stage" "$RUN/export/$stage" >&2
  fi
  [ -f "$RUN/export/$stage/shine_config.json" ] || { echo "no $stage checkpoint: run that stage first" >&2; exit 1; }
  echo "$RUN/export/$stage"
}

train_stage() {  # stage steps batch lr data context [init stage]
  local stage=$1 steps=$2 batch=$3 lr=$4 data=$5 context=$6 init=() from
  if [ -n "${7:-}" ]; then from=$(ckpt "$7"); init=(--init-from "$from"); fi
  [ -n "$RESUME" ] || rm -rf "${RUN:?}/$stage" "$RUN/export/$stage"
  $PY train.py --stage "$stage" --preset smollm2 --model "$MODEL" --data "$data" --out-dir "$RUN/$stage" \
    --meta-lora-rank "$META_RANK" --lora-scale "$LORA_SCALE" --memory-norm "$MEMORY_NORM" --max-context "$context" --max-steps "$steps" \
    --batch-size "$batch" --grad-accum 1 --lr "$lr" --eval-every "$EVAL_EVERY" --save-every "$SAVE_EVERY" \
    ${RESUME:+--resume} "${init[@]}" ${COMPILE:+--compile "$COMPILE"} $TRAIN_EXTRA
  $PY benchmarks/shine_135m.py export --run "$RUN" --stage "$stage"
  if [ -n "${OUT:-}" ]; then split_parts "$RUN/export/$stage" "$OUT/ckpt/$stage"; fi
}

split_parts() {  # src dst: hypernetwork.safetensors in <= 15 MiB parts, the JSON files, and SHA256SUMS of all
  local src=$1 dst=$2
  mkdir -p "$dst"
  split -b "$PART_SIZE" -d -a 1 "$src/hypernetwork.safetensors" "$dst/hypernetwork.safetensors.part"
  cp "$src"/*.json "$dst/"
  [ ! -f "$src/README.md" ] || cp "$src/README.md" "$dst/"
  (cd "$src" && sha256sum hypernetwork.safetensors ./*.json $(ls README.md 2>/dev/null)) > "$dst/SHA256SUMS.tmp"
  (cd "$dst" && sha256sum hypernetwork.safetensors.part*) >> "$dst/SHA256SUMS.tmp"
  mv "$dst/SHA256SUMS.tmp" "$dst/SHA256SUMS"
}

evaluate() {  # name bench methods [evaluate.py flags]
  local name=$1 bench=$2 methods=$3 final; shift 3
  final=$(ckpt ift-1qa bf16)  # what gets shipped, so the README's numbers are the shipped checkpoint's
  $PY evaluate.py --bench "$bench" --method "$methods" --model "$MODEL" --shine-ckpt "$final" \
    --batch-size "$EVAL_BATCH" --max-new-tokens "$MAX_NEW_TOKENS" --max-context-tokens "$MAX_CONTEXT" --seed 42 \
    --out "$RESULTS/$name.json" ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"} ${MERGE:+--merge} "$@" $EVAL_EXTRA
}

export_results() {
  if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/results/shine-135m" && cp "$@" "$OUT/results/shine-135m/"; fi
}

for cmd in "$@"; do
  start=$SECONDS
  echo "=== shine_135m.sh $cmd ($(date -u +%H:%M:%S) UTC)"
  case $cmd in
    timing)  # the bundled samples (the preset's data): same kinds of text, ready in seconds
      $PY benchmarks/shine_135m.py params --model "$MODEL" --meta-ranks "32,$META_RANK,48" $TRAIN_EXTRA
      for spec in "pretrain $PRETRAIN_BATCH $PRETRAIN_CONTEXT" "ift-mqa $MQA_BATCH $MAX_CONTEXT" \
                  "ift-1qa $ONEQA_BATCH $MAX_CONTEXT"; do
        read -r stage batch context <<< "$spec"
        rm -rf "$RUN/timing/$stage" && mkdir -p "$RUN/timing"
        $PY train.py --stage "$stage" --preset smollm2 --model "$MODEL" --out-dir "$RUN/timing/$stage" \
          --meta-lora-rank "$META_RANK" --lora-scale "$LORA_SCALE" --memory-norm "$MEMORY_NORM" \
          --max-context "$context" \
          --max-steps "$TIMING_STEPS" --batch-size "$batch" \
          --grad-accum 1 --eval-every 1000000 --save-every 1000000 ${COMPILE:+--compile "$COMPILE"} $TRAIN_EXTRA \
          > "$RUN/timing/$stage.log" 2>&1 \
          || { tail -20 "$RUN/timing/$stage.log"; exit 1; }
      done
      $PY benchmarks/shine_135m.py timing --run "$RUN" --minutes "$TIMING_MINUTES" ;;
    pretrain) prepare; train_stage pretrain "$PRETRAIN_STEPS" "$PRETRAIN_BATCH" "$PRETRAIN_LR" "$SHIFTS,$DATA/coqa_train.json.gz" \
      "$PRETRAIN_CONTEXT" ;;
    ift-mqa) prepare; train_stage ift-mqa "$MQA_STEPS" "$MQA_BATCH" "$MQA_LR" "$DATA/coqa_train.json.gz,$SHIFTS" \
      "$MAX_CONTEXT" pretrain ;;
    ift-1qa) prepare; train_stage ift-1qa "$ONEQA_STEPS" "$ONEQA_BATCH" "$ONEQA_LR" "$SHIFTS" "$MAX_CONTEXT" ift-mqa ;;
    eval)
      prepare
      mkdir -p "$RESULTS"
      for bench in $BENCHES; do
        case $bench in
          squad) evaluate squad squad "$TABLE2_METHODS" --data-file "$DATA/squad_dev1000_seed42.jsonl" ;;
          coqa) evaluate coqa-heldout msmarco-mqa "$COQA_METHODS" --data-file "$DATA/coqa_heldout50.jsonl" ;;
          *) evaluate "$bench" "$bench" "$TABLE2_METHODS" ;;  # the bundled samples: 103 / 200 / 200
        esac
        export_results "$RESULTS/${bench/coqa/coqa-heldout}.json"
      done ;;
    curves)
      specs=()  # the base model always; the pretraining and final checkpoints where they exist
      if have pretrain; then path=$(ckpt pretrain bf16); specs+=(--ckpt "pretrain=$path"); fi
      if have ift-1qa; then path=$(ckpt ift-1qa bf16); specs+=(--ckpt "final=$path"); fi
      # lines computed earlier (this machine's run, or a results file carried in the tree) are kept
      [ -f "$RUN/recon_curves.json" ] || [ ! -f "$RESULTS/recon_curves.json" ] || cp "$RESULTS/recon_curves.json" "$RUN/"
      $PY benchmarks/recon_curves.py --model "$MODEL" --base "${specs[@]}" --buckets "$CURVE_BUCKETS" \
        --per-bucket "$CURVE_PER_BUCKET" --batch-size "$CURVE_BATCH" --out "$RUN/recon_curves.json"
      mkdir -p "$RESULTS" && cp "$RUN/recon_curves.json" "$RESULTS/"
      export_results "$RESULTS/recon_curves.json" ;;
    package)
      prepare  # the data list
      for stage in pretrain ift-mqa ift-1qa; do  # restores exports from $CKPT_IN where this machine has no run
        if have $stage || [ $stage = ift-1qa ]; then path=$(ckpt $stage); fi
      done
      $PY benchmarks/shine_135m.py package --run "$RUN" --data "$DATA" --out "$PACKAGE_DIR" --results "$RESULTS"
      if [ -n "${OUT:-}" ]; then split_parts "$PACKAGE_DIR" "$OUT/checkpoint"; fi ;;
    *) echo "unknown subcommand $cmd; use timing, pretrain, ift-mqa, ift-1qa, eval, curves, package" >&2; exit 2 ;;
  esac
  echo "=== $cmd done in $((SECONDS - start)) s"
done
