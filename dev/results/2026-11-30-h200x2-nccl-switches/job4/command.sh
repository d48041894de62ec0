export PYTHONPATH=$PWD/src PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
s=(--params configs/train/cerebras-gpt-1.3b.yaml --steps 30 --log_steps 5 --set train_input.data_dir=.devdata/c2048)
k=(--set runconfig.fsdp_reshard_after_forward=false --set runconfig.grad_reduce_dtype=bf16)
b=(--baseline .devdata/base_s9/scaling.json --devices 2)
r(){ l=$1; shift; timeout 120 env "$@" > $OUT/$l.log 2>&1; grep -E "^\| (ddp|fsdp)" $OUT/$l.log | tail -1 | sed "s/^/$l /"; }
r symm2 LMFAB_EXP_SYMM_AG=1 NCCL_CTA_POLICY=2 python3 benchmarks/scaling.py "${s[@]}" "${b[@]}" --strategies fsdp "${k[@]}" --out /tmp/symm2
r keep16b python3 benchmarks/scaling.py "${s[@]}" "${b[@]}" --strategies fsdp "${k[@]}" --out /tmp/keep16b
r symm0 LMFAB_EXP_SYMM_AG=1 python3 benchmarks/scaling.py "${s[@]}" "${b[@]}" --strategies fsdp "${k[@]}" --out /tmp/symm0
for d in symm2 keep16b symm0; do cp /tmp/$d/fsdp-2.log $OUT/$d-run.log 2>/dev/null; done
grep -h "EXPERIMENT\|Error" $OUT/*-run.log | sort | uniq -c | head
