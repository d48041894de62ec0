export PYTHONPATH=$PWD/src PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
s=(--params configs/train/cerebras-gpt-1.3b.yaml --steps 30 --log_steps 5 --set train_input.data_dir=.devdata/c2048)
k=(--set runconfig.fsdp_reshard_after_forward=false --set runconfig.grad_reduce_dtype=bf16)
timeout 150 python3 benchmarks/scaling.py "${s[@]}" --devices 1 --strategies ddp --out $OUT/base >$OUT/base.log 2>&1
b=(--baseline $OUT/base/scaling.json --devices 2)
r(){ l=$1; shift; timeout 110 env "$@" > $OUT/$l.log 2>&1; grep -E "^\| (ddp|fsdp)" $OUT/$l.log | tail -1 | sed "s/^/$l /"; }
r keep16 python3 benchmarks/scaling.py "${s[@]}" "${b[@]}" --strategies fsdp "${k[@]}" --out $OUT/keep16
r symm2 LMFAB_EXP_SYMM_AG=1 NCCL_CTA_POLICY=2 python3 benchmarks/scaling.py "${s[@]}" "${b[@]}" --strategies fsdp "${k[@]}" --out $OUT/symm2
r cta1 NCCL_CTA_POLICY=1 python3 benchmarks/scaling.py "${s[@]}" "${b[@]}" --strategies fsdp "${k[@]}" --out $OUT/cta1
r ddpcta1 NCCL_CTA_POLICY=1 python3 benchmarks/scaling.py "${s[@]}" "${b[@]}" --strategies ddp --out $OUT/ddpcta1
grep -E "^\| ddp" $OUT/base.log | tail -1 | sed "s/^/base /"
grep -h EXPERIMENT $OUT/*/*/*.log $OUT/*.log 2>/dev/null | head -2; grep -il "error\|Traceback" $OUT/*.log $OUT/*/*/*.log 2>/dev/null | head
