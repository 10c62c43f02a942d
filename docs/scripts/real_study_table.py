"""Markdown tables of the real-data study from its workdirs (docs/reproductions.md section 6).

  python docs/scripts/real_study_table.py --study $STUDY

Reads $STUDY/ft/<task>_f<fraction>/summary.csv (the fine-tuning job's mean, Student-t 95% CI
over seeds and paired t-test against scratch) and $STUDY/baseline/<task>_f<fraction>/seed_<s>/
results.json (docs/scripts/torch_baseline.py). The baseline peer is compared with each ViT start
by Welch's t-test over seeds (scipy.stats.ttest_ind, equal_var=False): different models, so the
seeds are not paired.
"""
import argparse
import csv
import glob
import json
import os
import re

import numpy as np
from scipy import stats

from ultrajax.eval import metrics

TASKS = {"busi_cls": ("BUSI 3-class diagnosis", "auroc", "macro AUROC"),
         "busi_seg": ("BUSI lesion segmentation", "dice", "Dice"),
         "hc18": ("HC18 head segmentation", "dice", "Dice")}


def fmt(mean, low, high):
  return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--study", required=True)
  a = p.parse_args()
  for task, (title, metric, label) in TASKS.items():
    dirs = sorted(filter(os.path.isdir, glob.glob(os.path.join(a.study, "ft", f"{task}_f*"))), reverse=True)
    if not dirs:
      continue
    print(f"\n{title}: test {label}, mean [95% t-CI] over seeds (per-seed values); p: paired "
          "t-test vs scratch (ViT rows), Welch t-test vs each ViT start (baseline row)\n")
    print("| fraction | start | n seeds | test " + label + " | per seed | diff vs scratch | p |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for d in dirs:
      fraction = re.search(r"_f([0-9.]+)$", d).group(1)
      vit = {}
      path = os.path.join(d, "summary.csv")
      rows = list(csv.DictReader(open(path))) if os.path.exists(path) else []
      for r in rows:
        if r["metric"] != metric:
          continue
        vit[r["variant"]] = np.array([float(v) for v in r["values"].split()])
        diff = f"{float(r['diff']):+.3f}" if r["reference"] else ""
        pval = f"{float(r['p_ttest']):.3g}" if r["reference"] else ""
        print(f"| {fraction} | {r['variant']} | {r['num_seeds']} | "
              f"{fmt(float(r['mean']), float(r['ci_low']), float(r['ci_high']))} | "
              f"{r['values']} | {diff} | {pval} |")
      runs = sorted(glob.glob(os.path.join(a.study, "baseline", f"{task}_f{fraction}", "seed_*",
                                           "results.json")))
      if runs:
        results = [json.load(open(f)) for f in runs]
        values = np.array([r["test"][metric] for r in results])
        mean, low, high = metrics.mean_ci(values, bounds=metrics.metric_range(metric))
        tests = ", ".join(
            f"{name} {stats.ttest_ind(values, v, equal_var=False).pvalue:.3g}"
            for name, v in vit.items() if len(v) > 1 and len(values) > 1)
        cpu = np.mean([r["cpu_seconds"] for r in results])
        epochs = np.mean([r["epochs"] for r in results])
        print(f"| {fraction} | {'CNN' if metric == 'auroc' else 'U-Net'} baseline ({cpu:.0f} CPU s, "
              f"{epochs:.0f} epochs) | {len(values)} | {fmt(mean, low, high)} | "
              f"{' '.join(f'{v:.4f}' for v in values)} | | {tests} |")


if __name__ == "__main__":
  main()
