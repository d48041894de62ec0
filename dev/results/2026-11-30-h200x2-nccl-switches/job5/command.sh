export PYTHONPATH=$PWD/src PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
s=(--params configs/train/gpt2-124m.yaml --steps 60 --log_steps 10 --set train_input.data_dir=.devdata/c1024)
timeout 200 python3 benchmarks/scaling.py "${s[@]}" --devices 1,2 --strategies ddp --out /tmp/b124 > $OUT/b124.log 2>&1
grep -E "^\| ddp" $OUT/b124.log | sed "s/^/default /"
b=(--baseline /tmp/b124/scaling.json --devices 2 --strategies ddp)
r(){ l=$1; shift; timeout 100 env "$@" > $OUT/$l.log 2>&1; grep -E "^\| ddp" $OUT/$l.log | tail -1 | sed "s/^/$l /"; }
r cta1 NCCL_CTA_POLICY=1 python3 benchmarks/scaling.py "${s[@]}" "${b[@]}" --out /tmp/cta1
r reg TORCH_NCCL_USE_TENSOR_REGISTER_ALLOCATOR_HOOK=1 python3 benchmarks/scaling.py "${s[@]}" "${b[@]}" --out /tmp/reg
r default2 python3 benchmarks/scaling.py "${s[@]}" "${b[@]}" --out /tmp/default2
for d in b124 cta1 reg default2; do cp /tmp/$d/ddp-2.log $OUT/$d-run2.log 2>/dev/null; done
