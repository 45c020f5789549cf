#!/usr/bin/env bash
# Re-join a checkpoint that came back from the device machine in <= 15 MiB parts (shine_135m.sh's split_parts):
# check every part, join them, check the whole file and the JSON / README files against SHA256SUMS.
#
#   bash benchmarks/unpack_checkpoint.sh FILES_AT/checkpoint                      # -> checkpoints/shine-smollm2-135m
#   bash benchmarks/unpack_checkpoint.sh FILES_AT/ckpt/pretrain runs/135m/export/pretrain
set -euo pipefail
src=${1:?usage: unpack_checkpoint.sh SRC_DIR [DST_DIR]}
dst=${2:-$(dirname "$0")/../checkpoints/shine-smollm2-135m}
[ -f "$src/SHA256SUMS" ] || { echo "$src has no SHA256SUMS" >&2; exit 1; }
(cd "$src" && grep ' hypernetwork.safetensors.part' SHA256SUMS | sha256sum --check --quiet)
mkdir -p "$dst"
cat "$src"/hypernetwork.safetensors.part? > "$dst/hypernetwork.safetensors.tmp"
mv "$dst/hypernetwork.safetensors.tmp" "$dst/hypernetwork.safetensors"
for f in "$src"/*.json "$src"/README.md; do [ ! -f "$f" ] || cp "$f" "$dst/"; done
grep -v ' hypernetwork.safetensors.part' "$src/SHA256SUMS" | (cd "$dst" && sha256sum --check --quiet)
echo "unpacked $(ls "$src"/hypernetwork.safetensors.part? | wc -l) parts into $dst: sha256 checked"
