# Sourced by benchmarks/gpu_bench.sh on the GPU machine: joins the parts that
# benchmarks/gpu_model_parts.sh cut (.models/<file>.part-aa, -ab, ...) into .models/<file> when
# that is not there yet, and keeps it only if its sha256 is the one kvos pins for the default model.
for first in .models/*.part-aa; do
  [ -e "$first" ] || continue
  whole=${first%.part-aa}
  [ -f "$whole" ] && continue
  cat "$whole".part-* > "$whole.joining"
  want=$(python3 -c "from userspace.programs.fetch import SMOLLM2_135M as m; print(m.sha256)")
  got=$(sha256sum "$whole.joining" | cut -d' ' -f1)
  if [ "$got" = "$want" ]; then
    mv "$whole.joining" "$whole" && echo "model: joined $whole from $(ls "$whole".part-* | wc -l) parts"
  else
    rm -f "$whole.joining"
    echo "model: the parts of $whole do not add up (sha256 $got, not $want): was a part not carried?"
  fi
done
