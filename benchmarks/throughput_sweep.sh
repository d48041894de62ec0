#!/usr/bin/env bash
# Throughput variants of one config, each in its own process, one table at the end.
# Usage: benchmarks/throughput_sweep.sh OUTDIR CONFIG STEPS WARMUP VARIANT...
# VARIANT_TIMEOUT (seconds, env) stops a variant that runs longer; its row then reads "-".
#   VARIANT: label=impl[;--set KEY=VALUE ...][;--profile N]  e.g.
#     "cudnn=lmfab;--set runconfig.kernels.attention_backend=cudnn;--profile 5"
# Each variant runs benchmarks/train_throughput.py; its table row, stderr (with the kernel
# breakdown when profiled) and JSON land in OUTDIR as <label>.{md,err,json}.
set -uo pipefail
out=${1:?outdir}; config=${2:?config}; steps=${3:?steps}; warmup=${4:?warmup}; shift 4
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
py=${PYTHON:-python3}
rows=()
for variant in "$@"; do
  label=${variant%%=*}; rest=${variant#*=}
  IFS=';' read -r -a parts <<< "$rest"
  impl=${parts[0]}; extra=()
  for p in "${parts[@]:1}"; do read -r -a words <<< "$p"; extra+=("${words[@]}"); done
  echo "== $label: $impl ${extra[*]}" >&2
  timeout "${VARIANT_TIMEOUT:-0}" $py benchmarks/train_throughput.py --config "$config" --impl "$impl" --steps "$steps" \
      --warmup "$warmup" --json "$out/$label.json" ${extra[@]+"${extra[@]}"} \
      > "$out/$label.md" 2> "$out/$label.err"
  row=$(grep "| $impl | " "$out/$label.md" | head -1)  # | config | devices | impl | ...
  [[ -n $row ]] && row="| ${row#*| $impl | }" || row="| - | - | did not finish | - | - | - | - |"
  rows+=("| $label $row")
  grep -E "GPU kernels|^  [a-z]" "$out/$label.err" >&2 || true
done
echo "| variant | params | micro-batch x T | step ms (median) | tokens/s | MFU | peak mem GiB | final loss |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
