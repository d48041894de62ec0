#!/usr/bin/env bash
# The scaling-law demonstration of docs/scaling.md, end to end on one GPU:
#   examples/scaling_laws.sh data     # pack the corpus at 512 with the 4096- and 16384-token BPEs
#   examples/scaling_laws.sh sweeps   # families (fit), muP LR sweep, 16k vocabulary, IsoFLOP
#   examples/scaling_laws.sh fit      # fits and the committed predictions of the held-out runs
#   examples/scaling_laws.sh heldout  # train the held-out runs (after their predictions are committed)
# CORPUS (default ../shared/corpus) holds the five sources; TOK the two tokenizer.json files
# (lmfab data tokenizer train --input $CORPUS/{books,reference,techdocs,code,arabic}
#  --out $TOK/tok4096.json --vocab_size 4096; likewise 16384). PAR: points at a time per sweep.
set -euo pipefail
CORPUS=${CORPUS:-../shared/corpus}
TOK=${TOK:-runs/tok}
PAR=${PAR:-5}
LMFAB=${LMFAB:-lmfab}
case "${1:-}" in
  data)
    for v in 4096 16384; do
      $LMFAB data pack --input $CORPUS/{books,reference,techdocs,code,arabic} \
        --tokenizer $TOK/tok$v.json --out runs/data/corpus-$((v / 1024))k --seq_len 512 &
    done
    wait ;;
  sweeps)
    $LMFAB sweep configs/sweeps/subscale-family.yaml --parallel "$PAR" &
    $LMFAB sweep configs/sweeps/subscale-mup-lr.yaml --parallel "$PAR" &
    $LMFAB sweep configs/sweeps/subscale-vocab.yaml --parallel "$PAR" &
    wait
    $LMFAB sweep configs/sweeps/subscale-family-1epoch.yaml --parallel "$PAR"
    $LMFAB sweep configs/sweeps/subscale-isoflop.yaml --parallel "$PAR" ;;
  fit)
    $LMFAB sweep configs/sweeps/subscale-heldout.yaml --list   # writes the target's params.yaml
    $LMFAB fit runs/sweeps/subscale-family -o docs/scaling/family \
      --predict runs/sweeps/subscale-heldout/points/heldout-params1.03e07/params.yaml
    $LMFAB fit runs/sweeps/subscale-mup-lr -o docs/scaling/mup-lr
    $LMFAB fit runs/sweeps/subscale-family --metric bpb -o docs/scaling/vocab-4k
    $LMFAB fit runs/sweeps/subscale-vocab16k --metric bpb -o docs/scaling/vocab-16k
    $LMFAB sweep configs/sweeps/subscale-heldout-1epoch.yaml --list
    $LMFAB fit runs/sweeps/subscale-family-1epoch --form both -o docs/scaling/family-1epoch \
      --predict runs/sweeps/subscale-heldout-1epoch/points/heldout-params4.5e06/params.yaml
    $LMFAB sweep configs/sweeps/subscale-heldout-isoflop.yaml --list
    $LMFAB fit runs/sweeps/subscale-isoflop --form both -o docs/scaling/isoflop \
      --predict runs/sweeps/subscale-heldout-isoflop/points/heldout-params5.9e06/params.yaml ;;
  heldout)
    $LMFAB sweep configs/sweeps/subscale-heldout.yaml
    $LMFAB sweep configs/sweeps/subscale-heldout-1epoch.yaml
    $LMFAB sweep configs/sweeps/subscale-heldout-isoflop.yaml ;;
  *) echo "usage: $0 data|sweeps|fit|heldout" >&2; exit 2 ;;
esac
