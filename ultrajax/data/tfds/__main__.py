"""Prepares ultrasound TFDS datasets from their published files (array_record, for data.source=tfds).

python -m ultrajax.data.tfds --name=busi --manual_dir=/data/busi --data_dir=/data/tfds
"""

import argparse

from ultrajax.data import tfds as us_tfds


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--name", required=True, help=f"one of {sorted(us_tfds.BUILDERS)}")
  parser.add_argument("--manual_dir", required=True, help="the dataset as its publishers ship it")
  parser.add_argument("--data_dir", required=True, help="where the prepared dataset is written")
  args = parser.parse_args(argv)
  builder = us_tfds.build(args.name, args.manual_dir, args.data_dir)
  print(f"{args.name}: {builder.info.splits} in {builder.data_dir}")


if __name__ == "__main__":
  main()
