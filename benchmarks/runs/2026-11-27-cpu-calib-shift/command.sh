set -e
cd /work/main
for shift in 3 1; do
  python benchmarks/quality/run_quality.py --model benchmarks/quality/checkpoint/model \
    --classifier benchmarks/quality/checkpoint/classifier --out /tmp/shift$shift --rows main --frames 1 \
    --topk 0.25 --block-q 64 --stage1-steps 40 --stage2-steps 60 --stage2-batch-size 2 --calib-samples 32 \
    --heldout-samples 20 --sample-per-class 1 --sample-steps 8 --device cpu --validate none --calib-shift $shift > /tmp/shift$shift.log 2>&1
done
echo finished
