#!/usr/bin/env bash
# The 2-GPU throughput checks, for the `nvidia-h200-x2` device kind (or any host
# with 2+ GPUs). Usage: benchmarks/multi_gpu_check.sh OUTDIR DATA1024 DATA2048 PART
#   PART: tests    the GPU test file, with the 2-GPU DDP test        (~2 min)
#         curves   124M loss curve, 1 GPU x 2 accumulation vs 2 GPUs, same global batch
#         scale124 124M DDP throughput on 1 and 2 GPUs               (~1 min)
#         scale13b 1.3B DDP and FSDP2 throughput on 1 and 2 GPUs     (~4 min)
#         trace124 124M DDP on 1 and 2 GPUs, no accumulation, profiled on every rank: the
#                  timeline line (GPU active, NCCL, exposed NCCL) per rank      (~3 min)
#         fsdp124  the no-accumulation gap with FSDP2 instead of DDP: 124M on 1 GPU and DDP
#                  on 2, then FSDP2 on 2 keeping the gathered blocks (ZeRO-2) with fp32 or
#                  bf16 gradient reduction, and resharding with bf16 reduction    (~8 min)
#         fsdp13b1 the same at 1.3B (micro-batch 12, no accumulation), ZeRO-2 only  (~8 min)
#         ddp16    124M DDP, no accumulation, 60 steps: 1 GPU and 2 GPUs as shipped, then 2 GPUs
#                  with runconfig.parallel.grad_reduce_dtype=bf16, graph cut at the buckets (as
#                  shipped) or whole (ddp_split_graph=false: all-reduces after backward) (~4 min)
#         accum    DDP at a fixed global batch reached by accumulation, gradients reduced once
#                  per optimizer step: 124M at the shipped 512 (16 / 8 micro-batches per step
#                  on 1 / 2 GPUs), 1.3B at 96 (8 / 4)                  (~7 min)
#         ddp13b   1.3B at a fixed global batch (96: 4 micro-batches per GPU per all-reduce):
#                  1 GPU, then 2 GPUs as shipped (ddp_split_graph auto: one compiled graph),
#                  with ddp_split_graph=true (graph cut at the buckets, 4% slower at 1.3B)
#                  and with true + 200 MB buckets (fewer cuts)               (~8 min)
#         fsdp13b  the same batch with FSDP2, resharding after forward or not   (~5 min)
#                  The variants run on 2 GPUs only; their efficiency is against ddp13b's
#                  1-GPU point (scaling.py --baseline): run ddp13b first, same OUTDIR
#         big      Cerebras-GPT-13B: plain DDP on one GPU (runs out of memory, with lmfab's
#                  advice), then FSDP2 on 2 GPUs, the YAML as shipped (strategy: fsdp)
# DATA*: dirs written by `lmfab data tokenize --seq_len 1024/2048` with a <=50304 vocab.
# Everything lands in OUTDIR; the last lines printed are the part's table.
set -uo pipefail
out=${1:?outdir}; d1024=${2:?data dir seq_len 1024}; d2048=${3:?data dir seq_len 2048}
part=${4:?part: tests, curves, scale124, scale13b, trace124, fsdp124, fsdp13b1, ddp16, accum, ddp13b, fsdp13b or big}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
py=${PYTHON:-python3}

case $part in
  tests)
    $py -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15 | tee "$out/pytest_gpu.txt" ;;
  curves)
    common=(--params configs/train/gpt2-124m.yaml --mode train --max_steps 60
            --set train_input.data_dir="$d1024" --set train_input.batch_size=64
            --set train_input.micro_batch_size=32 --set optimizer.learning_rate=6e-4
            --set runconfig.log_steps=5 --set runconfig.checkpoint_at_end=false
            --set runconfig.tensorboard=false)
    $py -m lmfab run "${common[@]}" --model_dir /tmp/curve-1gpu --num_devices 1 > "$out/curve-1gpu.log" 2>&1
    $py -m lmfab run "${common[@]}" --model_dir /tmp/curve-2gpu --num_devices 2 > "$out/curve-2gpu.log" 2>&1
    cp /tmp/curve-1gpu/metrics.jsonl "$out/curve-1gpu.jsonl"; cp /tmp/curve-2gpu/metrics.jsonl "$out/curve-2gpu.jsonl"
    $py benchmarks/compare_curves.py /tmp/curve-1gpu /tmp/curve-2gpu --labels "1 GPU (2x accum),2 GPUs" \
        --png "$out/curves.png" --json "$out/curves.json" | tee "$out/curves.md" ;;
  scale124)
    $py benchmarks/scaling.py --params configs/train/gpt2-124m.yaml --devices 1,2 --strategies ddp \
        --steps 40 --set train_input.data_dir="$d1024" --out "$out/scale124" 2>&1 | tail -8 ;;
  scale13b)
    $py benchmarks/scaling.py --params configs/train/cerebras-gpt-1.3b.yaml --devices 1,2 \
        --strategies ddp,fsdp --steps 30 --set train_input.data_dir="$d2048" --out "$out/scale13b" 2>&1 | tail -10 ;;
  trace124)
    # The no-accumulation gap (94-96%): 124M on 1 and 2 GPUs, every micro-batch all-reduced,
    # steps 21-23 profiled on every rank: GPU active time, NCCL time, and the NCCL time no
    # compute ran beside (exposed). Traces in OUT/trace124/ddp-*/profile/         (~3 min)
    $py benchmarks/scaling.py --params configs/train/gpt2-124m.yaml --devices 1,2 --strategies ddp \
        --steps 30 --log_steps 5 --set train_input.data_dir="$d1024" --set runconfig.profile.steps=3 \
        --set runconfig.profile.start=20 --out "$out/trace124" 2>&1 | grep "^| ddp"
    for f in "$out"/trace124/ddp-*/profile/kernels_rank*.txt; do
      echo "== ${f#"$out"/}"; head -9 "$f"
    done ;;
  fsdp124|fsdp13b1|ddp16)
    # No accumulation (one reduction per micro-batch). FSDP2 reduce-scatters each block's
    # gradients during backward (DDP's last buckets are reduced after it), steps AdamW on half
    # the parameters, and with grad_reduce_dtype=bf16 moves half the bytes.
    # The 1-GPU point runs once (with the plain DDP run, labelled $base); the 2-GPU variants
    # (LABEL:STRATEGY:KEY=VALUE,...) use it.
    # fsdp124: 124M, 100 steps (~8 min); fsdp13b1: 1.3B, 30 steps, keep only (~8 min);
    # ddp16: 124M DDP with bf16 reduction, graph cut or whole, 60 steps (~4 min)
    base=ddp
    case $part in
      fsdp124)
        s=(--params configs/train/gpt2-124m.yaml --steps 100 --log_steps 10
           --set train_input.data_dir="$d1024")
        variants=(keep32:fsdp:fsdp_reshard_after_forward=false,grad_reduce_dtype=fp32
                  keep16:fsdp:fsdp_reshard_after_forward=false,grad_reduce_dtype=bf16
                  reshard16:fsdp:fsdp_reshard_after_forward=true,grad_reduce_dtype=bf16) ;;
      fsdp13b1)
        s=(--params configs/train/cerebras-gpt-1.3b.yaml --steps 30 --log_steps 5
           --set train_input.data_dir="$d2048")
        variants=(keep32:fsdp:fsdp_reshard_after_forward=false,grad_reduce_dtype=fp32
                  keep16:fsdp:fsdp_reshard_after_forward=false,grad_reduce_dtype=bf16) ;;
      ddp16)
        s=(--params configs/train/gpt2-124m.yaml --steps 60 --log_steps 10
           --set train_input.data_dir="$d1024")
        base=fp32
        variants=(cut16:ddp:grad_reduce_dtype=bf16,ddp_split_graph=true
                  whole16:ddp:grad_reduce_dtype=bf16,ddp_split_graph=false) ;;
    esac
    $py benchmarks/scaling.py "${s[@]}" --devices 1,2 --strategies ddp --out "$out/$part-$base" \
        2>&1 | grep "^| ddp" | sed "s/^/$base /"
    [[ -f $out/$part-$base/scaling.json ]] || { echo "no 1-GPU point: see $out/$part-$base/" >&2; exit 1; }
    for v in "${variants[@]}"; do
      IFS=: read -r label strategy settings <<< "$v"
      IFS=, read -ra kv <<< "$settings"
      sets=(); for x in "${kv[@]}"; do sets+=(--set "runconfig.parallel.$x"); done
      $py benchmarks/scaling.py "${s[@]}" --devices 2 --strategies "$strategy" "${sets[@]}" \
          --baseline "$out/$part-$base/scaling.json" --out "$out/$part-$label" 2>&1 \
          | grep "^| $strategy" | sed "s/^/$label /"
    done ;;
  accum)
    $py benchmarks/scaling.py --params configs/train/gpt2-124m.yaml --devices 1,2 --strategies ddp \
        --global_batch 512 --steps 16 --log_steps 2 --set train_input.data_dir="$d1024" \
        --out "$out/accum124" 2>&1 | grep "^| ddp" | sed "s/^/124M /"
    $py benchmarks/scaling.py --params configs/train/cerebras-gpt-1.3b.yaml --devices 1,2 \
        --strategies ddp --global_batch 96 --steps 12 --log_steps 2 \
        --set train_input.data_dir="$d2048" --out "$out/accum13b" 2>&1 | grep "^| ddp" | sed "s/^/1.3B /" ;;
  ddp13b|fsdp13b)
    b13=(--params configs/train/cerebras-gpt-1.3b.yaml --global_batch 96 --steps 10 --log_steps 2
         --warmup 1 --set train_input.data_dir="$d2048")
    if [[ $part == ddp13b ]]; then
      $py benchmarks/scaling.py "${b13[@]}" --devices 1,2 --strategies ddp --out "$out/ddp13b-default" \
          2>&1 | grep "^| ddp" | sed "s/^/default /"
      for v in split:ddp_split_graph=true bucket200:ddp_bucket_mb=200; do
        extra=(--set "runconfig.parallel.${v#*:}"); [[ $v == bucket200:* ]] && extra+=(--set runconfig.parallel.ddp_split_graph=true)
        $py benchmarks/scaling.py "${b13[@]}" --devices 2 --strategies ddp "${extra[@]}" \
            --baseline "$out/ddp13b-default/scaling.json" --out "$out/ddp13b-${v%%:*}" 2>&1 \
            | grep "^| ddp" | sed "s/^/${v%%:*} /"
      done
    else
      for v in reshard:fsdp_reshard_after_forward=true keep:fsdp_reshard_after_forward=false; do
        base=(); [[ -f $out/ddp13b-default/scaling.json ]] && base=(--baseline "$out/ddp13b-default/scaling.json")
        $py benchmarks/scaling.py "${b13[@]}" --devices 2 --strategies fsdp --set "runconfig.parallel.${v#*:}" \
            ${base[@]+"${base[@]}"} --out "$out/fsdp13b-${v%%:*}" 2>&1 | grep "^| fsdp" | sed "s/^/${v%%:*} /"
      done
    fi ;;
  big)
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    small=(--set train_input.data_dir="$d2048" --set runconfig.checkpoint_at_end=false
           --set runconfig.tensorboard=false --set runconfig.log_steps=1)
    timeout 300 $py -m lmfab run --params configs/train/cerebras-gpt-13b.yaml --mode train \
        --model_dir /tmp/big-ddp1 --num_devices 1 --max_steps 1 --set runconfig.parallel.strategy=ddp \
        --set runconfig.parallel.compile=false --set train_input.batch_size=1 \
        --set train_input.micro_batch_size=1 "${small[@]}" > "$out/big-ddp1.log" 2>&1
    echo "13B, plain DDP on one GPU: exit $?" | tee -a "$out/big-ddp1.log"
    grep -E "^lmfab: error|out of device memory" "$out/big-ddp1.log" | cut -c1-600
    $py benchmarks/scaling.py --params configs/train/cerebras-gpt-13b.yaml --devices 2 \
        --strategies fsdp --steps 10 --log_steps 2 --warmup 2 --set train_input.data_dir="$d2048" \
        --out "$out/big" 2>&1 | tail -4
    grep -E "^step|memory|parameters" "$out/big/fsdp-2.log" | tail -8 ;;
  *) echo "unknown part: $part" >&2; exit 2 ;;
esac
