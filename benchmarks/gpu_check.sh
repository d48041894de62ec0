#!/usr/bin/env bash
# The one-GPU check: GPU tests, real-data training runs of the 124M and 1.3B
# shapes (bf16, compiled, a few dozen steps), then the throughput benchmark beside HF GPT-2.
# Usage: benchmarks/gpu_check.sh OUTDIR DATA1024 DATA2048 [part]
#   part: all (default) | runs | bench124 | bench13b | fp8 | graphs | long | alibi | mlp
# DATA*: dirs written by `lmfab data tokenize --seq_len 1024/2048` with a <=50304 vocab.
set -uo pipefail
out=${1:?outdir}; d1024=${2:?data dir seq_len 1024}; d2048=${3:?data dir seq_len 2048}
part=${4:-all}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
py=${PYTHON:-python3}

# both_shapes NAME TIMEOUT13B VARIANT...: throughput_sweep.sh variants at 124M (30 steps after
# 10, the last 3 profiled; 150 s each) and at 1.3B (12 after 6, 2 profiled; TIMEOUT13B s
# each), into OUT/NAME124 and OUT/NAME13b
both_shapes() {
  local name=$1 t13b=$2; shift 2
  VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-150} benchmarks/throughput_sweep.sh "$out/${name}124" \
      configs/train/gpt2-124m.yaml 30 10 "${@/%/;--profile 3}" | tee "$out/${name}124.md"
  VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-$t13b} benchmarks/throughput_sweep.sh "$out/${name}13b" \
      configs/train/cerebras-gpt-1.3b.yaml 12 6 "${@/%/;--profile 2}" | tee "$out/${name}13b.md"
}

if [[ $part == all || $part == runs ]]; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $py -c "import torch, transformers, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, transformers.__version__)"
  } | tee "$out/env.txt"
  $py -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -4 | tee "$out/pytest_gpu.txt"
  common=(--mode train_and_eval --set runconfig.log_steps=5 --set eval_input.max_batches=1)
  $py -m lmfab run --params configs/train/gpt2-124m.yaml "${common[@]}" --model_dir /tmp/lmfab-r124 \
      --max_steps 30 --set train_input.data_dir="$d1024" --set train_input.batch_size=128 \
      --set optimizer.learning_rate=6e-4 --set eval_input.batch_size=16 \
      --set eval_input.micro_batch_size=16 2>&1 | tee "$out/run124.log" | grep -E "^step|^eval|parameters|memory"
  $py -m lmfab run --params configs/train/cerebras-gpt-1.3b.yaml "${common[@]}" --model_dir /tmp/lmfab-r13 \
      --max_steps 20 --set train_input.data_dir="$d2048" --set train_input.batch_size=48 \
      --set optimizer.learning_rate=2e-4 --set eval_input.batch_size=8 \
      --set eval_input.micro_batch_size=4 2>&1 | tee "$out/run13b.log" | grep -E "^step|^eval|parameters|memory"
fi
if [[ $part == all || $part == bench124 ]]; then
  $py benchmarks/train_throughput.py --config configs/train/gpt2-124m.yaml \
      --impl lmfab,lmfab-eager,hf-eager,hf-compile --steps 30 --warmup 10 \
      --json "$out/bench124.json" 2>"$out/bench124.err" | tee "$out/bench124.md"
fi
if [[ $part == all || $part == bench13b ]]; then
  $py benchmarks/train_throughput.py --config configs/train/cerebras-gpt-1.3b.yaml \
      --impl lmfab,lmfab-eager,hf-eager,hf-compile --steps 20 --warmup 8 \
      --json "$out/bench13b.json" 2>"$out/bench13b.err" | tee "$out/bench13b.md"
fi
if [[ $part == fp8 ]]; then
  # runconfig.parallel.float8 against bf16, each variant in its own process (needs torchao: carry the
  # wheel and put it on PYTHONPATH). ~2 min at 124M, ~4 min at 1.3B.
  for c in gpt2-124m cerebras-gpt-1.3b; do
    VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-240} benchmarks/throughput_sweep.sh "$out/fp8-$c" \
        configs/train/$c.yaml 20 8 "bf16=lmfab" "fp8_tensorwise=lmfab;--set runconfig.parallel.float8=tensorwise" \
        "fp8_rowwise=lmfab;--set runconfig.parallel.float8=rowwise" | tee "$out/fp8-$c.md"
  done
fi
if [[ $part == graphs ]]; then
  # CUDA graphs (compile_mode reduce-overhead) against the default compile at 124M, where the
  # host leaves the GPU idle 1.6 ms of a 60.7 ms step (the 2026-11-29 profile, dev/LOG.md). ~2 min.
  VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-200} benchmarks/throughput_sweep.sh "$out/graphs" \
      configs/train/gpt2-124m.yaml 30 10 "default=lmfab" \
      "cudagraphs=lmfab;--set runconfig.parallel.compile_mode=reduce-overhead" | tee "$out/graphs.md"
fi
if [[ $part == mlp ]]; then
  # runconfig.kernels.mlp_kernel: the bias + GELU kernels alone against inductor's, then whole steps
  # fused vs standard at 124M and 1.3B, profiled (~6 min).
  $py benchmarks/mlp_activation.py --json "$out/mlp.json" 2>"$out/mlp.err" | tee "$out/mlp.md"
  both_shapes mlp 150 "fused=lmfab" "standard=lmfab;--set runconfig.kernels.mlp_kernel=standard"
fi
if [[ $part == long ]]; then
  # 1.3B at T=32768, one sequence per step: full activation checkpointing, every 2nd block,
  # none (each in its own process; ~3 min). What runconfig.parallel.checkpoint_every buys, and costs.
  T=32768; lc=(--set model.max_seq_len=$T --micro_batch 1 --seq_len $T)
  VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-200} benchmarks/throughput_sweep.sh "$out/long" \
      configs/train/cerebras-gpt-1.3b.yaml 6 3 \
      "ac_all=lmfab;${lc[*]};--set runconfig.parallel.activation_checkpointing=true" \
      "ac_half=lmfab;${lc[*]};--set runconfig.parallel.activation_checkpointing=true;--set runconfig.parallel.checkpoint_every=2" \
      "ac_none=lmfab;${lc[*]}" | tee "$out/long.md"
fi
if [[ $part == alibi ]]; then
  # ALiBi: kernel speed against causal SDPA, then a 12 x 768 ALiBi/SwiGLU/muP model trained at
  # T=2048 and evaluated at T=2048 and T=8192 (extrapolation). DATA2048 / $4-th arg's 8192 dir.
  d8192=${5:?data dir seq_len 8192}
  $py benchmarks/alibi_attention.py --json "$out/alibi.json" 2>"$out/alibi.err" | tee "$out/alibi.md"
  sets=(--set model.pos=alibi --set model.mlp=swiglu --set model.d_ff=2048 --set model.max_seq_len=2048
        --set model.attn_score_scale=inv_d_head --set model.mup_base_d_model=256 --set model.init_std=0.08
        --set model.embedding_mult=10.0 --set train_input.seq_len=2048 --set train_input.data_dir="$d2048"
        --set train_input.batch_size=32 --set train_input.micro_batch_size=16
        --set optimizer.learning_rate=6e-3 --set eval_input.batch_size=8 --set eval_input.micro_batch_size=4
        --set eval_input.max_batches=1 --set runconfig.log_steps=25)
  $py -m lmfab run --params configs/train/gpt2-124m.yaml "${sets[@]}" --mode train_and_eval \
      --model_dir /tmp/lmfab-alibi --max_steps 200 2>&1 | tee "$out/alibi_train.log" | grep -E "^step|^eval"
  $py -m lmfab run --params configs/train/gpt2-124m.yaml "${sets[@]}" --mode eval --model_dir /tmp/lmfab-alibi \
      --set eval_input.seq_len=8192 --set eval_input.data_dir="$d8192" --set eval_input.batch_size=2 \
      --set eval_input.micro_batch_size=1 2>&1 | tee "$out/alibi_eval8k.log" | grep -E "^eval"
fi
