"""Issue 12: the compare-profile run's figures as markdown rows (from a project folder's metrics/).

Usage: `python bench/compare/table.py /path/to/project` after `dvc exp run -S 'model.names=[lerenet,baseline,prototype,sofs,jaffnet]'`
there. Prints per model: paper mIoU K=1 / K=5 per fold and mean, support gain, false alarms at K=1 per fold,
and the IoU of the small-defect classes (MT_Blowhole, MT_Crack, MT_Break) at K=1 / K=5.
"""
import csv, json, sys
from pathlib import Path

root = Path(sys.argv[1])
folds = [json.loads((root / f"metrics/fold{f}.json").read_text()) for f in (0, 1, 2)]
per_class = {}
for f in (0, 1, 2):
    for r in csv.DictReader(open(root / f"metrics/per_class/fold{f}.csv")):
        if r["protocol"] == "paper":
            per_class[(r["model"], int(r["shots"]), r["class_name"])] = 100 * float(r["iou"])
models = [m for m in folds[0] if m != "device"]
print("| model | K=1 paper (f0 / f1 / f2) | mean | K=5 paper (f0 / f1 / f2) | mean | support gain K1 / K5 | FP K1 % (f0 / f1 / f2) | MT_Blowhole | MT_Crack | MT_Break |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for m in models:
    k1 = [100 * d[m]["k1"]["paper"]["miou"] for d in folds]
    k5 = [100 * d[m]["k5"]["paper"]["miou"] for d in folds]
    g1 = sum(100 * d[m]["k1"]["support_gain"] for d in folds) / 3
    g5 = sum(100 * d[m]["k5"]["support_gain"] for d in folds) / 3
    fp = [100 * d[m]["fp"]["k1"]["image_rate"] for d in folds]
    small = [f"{per_class[(m, 1, c)]:.1f} / {per_class[(m, 5, c)]:.1f}" for c in ("MT_Blowhole", "MT_Crack", "MT_Break")]
    print(f"| {m} | {' / '.join(f'{x:.1f}' for x in k1)} | {sum(k1) / 3:.1f} | {' / '.join(f'{x:.1f}' for x in k5)} | "
          f"{sum(k5) / 3:.1f} | {g1:+.1f} / {g5:+.1f} | {' / '.join(f'{x:.1f}' for x in fp)} | {' | '.join(small)} |")
