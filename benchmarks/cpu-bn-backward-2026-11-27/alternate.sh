#!/bin/bash
for i in 1 2 3; do
  echo "== old run $i $(date -u +%H:%M)"
  /tmp/gpunorm_old --cpu bench --threads 2 --shapes 65536x1024,16384x4096 --ops batch_norm_train,batch_norm_backward --reps 5 2>&1 | grep -E "^  (copy|batch)"
  echo "== new run $i $(date -u +%H:%M)"
  /tmp/gpunorm_new --cpu bench --threads 2 --shapes 65536x1024,16384x4096 --ops batch_norm_train,batch_norm_backward,batch_norm_backward_alloc --reps 5 2>&1 | grep -E "^  (copy|batch)"
done
