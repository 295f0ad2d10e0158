# --gamma auto at the demo's shape (scripts/demo.sh: its 4 prompts, B = 4, 64 new tokens, budget 64,
# sink 16), plain decoding and gamma 2 / 4 / auto, in two checkouts side by side: $TREES/main (this
# commit) and $TREES/before (8e555f2, the auto before issue 20); 3 interleaved repeats, one process a run.
#   TREES=/path/to/checkouts bash benchmarks/cpu-auto-gamma/demo/run.sh
out=$(realpath "${OUT:-benchmarks/cpu-auto-gamma/demo}"); mkdir -p "$out"
for r in 1 2 3; do
 for tree in main before; do
  for cfg in none 2 4 auto; do
   if [ $cfg = none ]; then extra="--draft none"; else extra="--gamma $cfg"; fi
   (cd "$TREES/$tree" && python3 generate.py --device cpu --batch_size 4 --max_new_tokens 64 --draft_budget 64 --sink 16 \
    --prompt "The old lighthouse keeper climbed the stairs one last time, and" \
    --prompt "Photosynthesis is the process by which plants" \
    --prompt "A short history of the bicycle begins in 1817, when" \
    --prompt "Dear diary, today I finally" $extra --json "$out/$tree-$cfg-$r.json" > /dev/null)
  done
 done
done
