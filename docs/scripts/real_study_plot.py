"""The real-data study at a glance: test metric against label fraction, one panel per task.

  python docs/scripts/real_study_plot.py   # docs/images/real_study.csv -> docs/images/real_study.png

The CSV holds the means and Student-t 95% CIs of docs/reproductions.md section 6's tables (one
row per task, fraction and start, as `real_study_table.py` prints them for each study folder);
the figure draws each start as a line with its CI as error bars, the baseline peer dashed.
"""

import argparse
import collections
import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TASKS = {
  "busi_cls": "BUSI diagnosis: macro AUROC",
  "busi_seg": "BUSI lesions: Dice",
  "hc18": "HC18 head: Dice",
}
STARTS = {
  "scratch": ("scratch", "0.5"),
  "ultrajax": ("federated UltraMIM", "C1"),
  "ultrajax_mae": ("ultrajax plain MAE", "C0"),
  "torch_mae": ("PyTorch MAE peer", "C2"),
  "baseline": ("CNN / U-Net, same CPU time", "C3"),
}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--csv", default="docs/images/real_study.csv")
  p.add_argument("--out", default="docs/images/real_study.png")
  a = p.parse_args()
  rows = collections.defaultdict(list)  # (task, start) -> [(fraction, mean, low, high)]
  for r in csv.DictReader(open(a.csv)):
    rows[r["task"], r["start"]].append(
      tuple(float(r[k]) for k in ("fraction", "mean", "ci_low", "ci_high"))
    )
  fig, axes = plt.subplots(1, len(TASKS), figsize=(4.2 * len(TASKS), 3.6))
  for ax, (task, title) in zip(axes, TASKS.items()):
    for i, (start, (label, color)) in enumerate(STARTS.items()):
      pts = sorted(rows.get((task, start), []))
      if not pts:
        continue
      f, m, lo, hi = zip(*pts)
      x = [
        v * (1 + 0.04 * (i - 2)) for v in f
      ]  # spread the starts so the error bars do not overlap
      ax.errorbar(
        x,
        m,
        yerr=[[mm - low for mm, low in zip(m, lo)], [h - mm for mm, h in zip(m, hi)]],
        label=label,
        color=color,
        marker="o",
        ms=4,
        capsize=2,
        ls="--" if start == "baseline" else "-",
      )
    ax.set_xscale("log")
    ax.set_xlim(0.085, 1.15)
    ax.set_xticks([0.1, 0.25, 1.0], ["0.1", "0.25", "1.0"])
    ax.minorticks_off()
    ax.set_xlabel("label fraction")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, loc="lower right")
  fig.suptitle("Real ultrasound: test metric, mean and 95% CI over 5 seeds", fontsize=11)
  fig.tight_layout()
  fig.savefig(a.out, dpi=110)
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
