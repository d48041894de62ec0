export PYTHONPATH=$PWD/src PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
s=(--params configs/train/cerebras-gpt-1.3b.yaml --steps 30 --log_steps 5 --set train_input.data_dir=.devdata/c2048)
k=(--set runconfig.fsdp_reshard_after_forward=false --set runconfig.grad_reduce_dtype=bf16)
R=TORCH_NCCL_USE_TENSOR_REGISTER_ALLOCATOR_HOOK=1
timeout 110 python3 benchmarks/scaling.py "${s[@]}" --devices 1 --strategies ddp --out /tmp/base > $OUT/base.log 2>&1
grep -E "^\| ddp" $OUT/base.log | sed "s/^/base /"
b=(--baseline /tmp/base/scaling.json --devices 2)
r(){ l=$1; shift; timeout 95 env "$@" > $OUT/$l.log 2>&1; grep -E "^\| (ddp|fsdp)" $OUT/$l.log | tail -1 | sed "s/^/$l /"; }
r ddp python3 benchmarks/scaling.py "${s[@]}" "${b[@]}" --strategies ddp --out /tmp/ddp
r ddpreg env $R python3 benchmarks/scaling.py "${s[@]}" "${b[@]}" --strategies ddp --out /tmp/ddpreg
r keep16reg env $R python3 benchmarks/scaling.py "${s[@]}" "${b[@]}" --strategies fsdp "${k[@]}" --out /tmp/keep16reg
for d in ddp ddpreg keep16reg; do cp /tmp/$d/*-2.log $OUT/$d-run.log 2>/dev/null; done
