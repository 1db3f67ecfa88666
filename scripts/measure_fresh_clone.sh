#!/usr/bin/env bash
# Time the README's two commands on a fresh clone of this repository:
#   install (make setup), `make demo`, `make test`; prints one JSON line.
# Usage: scripts/measure_fresh_clone.sh [DEST]   (DEST default: ../fresh-clone,
# beside this checkout, so ../shared resolves the same way it does here)
set -euo pipefail
src=$(git rev-parse --show-toplevel)
dest=${1:-$(dirname "$src")/fresh-clone}
if [ -e "$dest" ]; then echo "refusing to overwrite $dest" >&2; exit 2; fi
git clone -q "$src" "$dest"
cd "$dest"
now() { date +%s.%N; }
t0=$(now); make setup > setup.log 2>&1
t1=$(now); make demo > demo.log 2>&1
t2=$(now); make test > test.log 2>&1
t3=$(now)
dice=$(python3 -c "import json;print(json.load(open('outputs/latest/summary.json'))['final_dice_mean'])")
tests=$(tail -n 1 test.log)
python3 - "$t0" "$t1" "$t2" "$t3" "$dice" "$tests" <<'PY'
import json, sys
t0, t1, t2, t3 = map(float, sys.argv[1:5])
print(json.dumps({"install_s": round(t1 - t0, 1), "demo_s": round(t2 - t1, 1),
                  "test_s": round(t3 - t2, 1), "demo_final_dice_mean": float(sys.argv[5]),
                  "pytest": sys.argv[6]}))
PY
