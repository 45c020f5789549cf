#!/usr/bin/env bash
# Issue 3 on GPUs: train.py's three stages at a model's shape with random weights (benchmarks/shapes/), each stage
# starting from the previous one's checkpoint, on the bundled data (--preset smollm2), then a throughput table.
#
#   bash benchmarks/train_shapes.sh qwen3-8b "30 20 20" "1 2 2"              # one GPU
#   LAUNCH="torchrun --nproc_per_node=2" FSDP=1 bash benchmarks/train_shapes.sh qwen3-8b "20" "1"   # FSDP2
#
# Arguments: shape, steps per stage, batch per GPU per stage (only the stages given run, in order). The shape
# folder needs a tokenizer beside its config (see shapes/README.md); TOKENIZER names a folder to copy one from.
set -euo pipefail
cd "$(dirname "$0")/.."
shape=$1; read -r -a steps <<< "$2"; read -r -a batches <<< "$3"
: "${LAUNCH:=python3}" "${FSDP:=}" "${RUN:=runs/shapes/$shape${FSDP:+-fsdp}}" "${META_RANK:=128}" "${TOKENIZER:=}"
: "${EXTRA:=}"
model=benchmarks/shapes/$shape
if [ -n "$TOKENIZER" ]; then  # the tokenizer files only: weights beside the config would be loaded as the model's
  for f in tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json; do
    [ ! -f "$TOKENIZER/$f" ] || cp "$TOKENIZER/$f" "$model/"
  done
fi
stages=(pretrain ift-mqa ift-1qa); runs=(); init=()
for i in "${!steps[@]}"; do
  stage=${stages[$i]}; rm -rf "${RUN:?}/$stage"
  $LAUNCH train.py --stage "$stage" --preset smollm2 --model "$model" --meta-lora-rank "$META_RANK" \
    --lora-scale 1e-3 --max-steps "${steps[$i]}" --batch-size "${batches[$i]}" --grad-accum 1 \
    --eval-every 1000000 --save-every 1000000 --out-dir "$RUN/$stage" ${FSDP:+--fsdp} "${init[@]}" $EXTRA
  init=(--init-from "$RUN/$stage"); runs+=("$RUN/$stage")
done
python3 benchmarks/train_summary.py "${runs[@]}" --out "$RUN/summary.json"
