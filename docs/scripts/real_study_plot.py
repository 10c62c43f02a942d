"""The real-data study at a glance: test metric against label fraction, one panel per task.

  python docs/scripts/real_study_plot.py   # docs/images/real_study.csv -> docs/images/real_study.png

The CSV holds the means and Student-t 95% CIs of docs/reproductions.md section 6's tables (one
row per task, fraction and start, as `real_study_table.py` prints them for each study folder).
Each panel is the fine-tuning job's label-efficiency plot (`ultrajax.viz.plots.label_efficiency`).
"""

import argparse
import collections
import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ultrajax.viz import plots  # noqa: E402

TASKS = {
  "busi_cls": ("BUSI diagnosis", "macro AUROC"),
  "busi_seg": ("BUSI lesions", "Dice"),
  "hc18": ("HC18 head", "Dice"),
}
STARTS = {
  "scratch": "scratch",
  "ultrajax": "federated UltraMIM",
  "ultrajax_mae": "ultrajax plain MAE",
  "torch_mae": "PyTorch MAE peer",
  "baseline": "CNN / U-Net, same CPU time",
}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--csv", default="docs/images/real_study.csv")
  p.add_argument("--out", default="docs/images/real_study.png")
  a = p.parse_args()
  curves = collections.defaultdict(dict)  # task -> {start label: [(fraction, mean, low, high)]}
  for r in csv.DictReader(open(a.csv)):
    point = tuple(float(r[k]) for k in ("fraction", "mean", "ci_low", "ci_high"))
    curves[r["task"]].setdefault(STARTS[r["start"]], []).append(point)
  fig, axes = plt.subplots(1, len(TASKS), figsize=(4.2 * len(TASKS), 3.6))
  for ax, (task, (title, metric)) in zip(axes, TASKS.items()):
    plots.label_efficiency(None, curves[task], metric, ax=ax, title=title)
  fig.suptitle("Real ultrasound: test metric, mean and 95% CI over 5 seeds", fontsize=11)
  print(f"wrote {plots.save(fig, a.out)}")


if __name__ == "__main__":
  main()
