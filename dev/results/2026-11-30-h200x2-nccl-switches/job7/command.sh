export PYTHONPATH=$PWD/src PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
s=(--params configs/train/gpt2-124m.yaml --steps 60 --log_steps 10 --set train_input.data_dir=.devdata/c1024)
timeout 130 python3 benchmarks/scaling.py "${s[@]}" --devices 1,2 --strategies ddp --out /tmp/b124 > $OUT/b124.log 2>&1
grep -E "^\| ddp" $OUT/b124.log | sed "s/^/default /"
timeout 75 env TORCH_NCCL_USE_TENSOR_REGISTER_ALLOCATOR_HOOK=1 python3 benchmarks/scaling.py "${s[@]}" --baseline /tmp/b124/scaling.json --devices 2 --strategies ddp --out /tmp/reg > $OUT/reg.log 2>&1
grep -E "^\| ddp" $OUT/reg.log | tail -1 | sed "s/^/reg /"
