"""TFDS builders of public ultrasound datasets (read from the publishers' files in manual_dir).

Importing this package registers the builders with TFDS (needs the [tfds] extra). Build one with
  tfds build ultrajax/data/tfds/busi.py --manual_dir=DIR --data_dir=OUT --file_format=array_record
or build(...) below; read it back with ultrajax.data.tfds.source (data.source='tfds').
"""

try:
  import tensorflow_datasets  # noqa: F401
except ImportError as e:
  raise ImportError(
    "data.source='tfds' and the ultrasound TFDS builders need TensorFlow Datasets: "
    "pip install 'ultrajax[tfds]'"
  ) from e

from ultrajax.data.tfds.bus_bra import BusBra
from ultrajax.data.tfds.busi import Busi
from ultrajax.data.tfds.camus import Camus
from ultrajax.data.tfds.ddti import Ddti
from ultrajax.data.tfds.fetal_planes_db import FetalPlanesDb
from ultrajax.data.tfds.hc18 import Hc18
from ultrajax.data.tfds.mmotu import Mmotu
from ultrajax.data.tfds.pocus import Pocus
from ultrajax.data.tfds.tg3k import Tg3k
from ultrajax.data.tfds.tn3k import Tn3k

BUILDERS = {
  b.name: b for b in (Busi, BusBra, Camus, Ddti, Hc18, FetalPlanesDb, Mmotu, Pocus, Tg3k, Tn3k)
}


def build(name: str, manual_dir: str, data_dir: str):
  """Prepares dataset `name` from `manual_dir` into `data_dir` as array_record; the builder."""
  if name not in BUILDERS:
    raise ValueError(f"no ultrasound TFDS builder {name!r}; the builders are {sorted(BUILDERS)}")
  import tensorflow_datasets as tfds

  builder = BUILDERS[name](data_dir=data_dir, file_format="array_record")
  # Feature statistics (TFDS's default) cost a second pass over the images; nothing reads them.
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, compute_stats=tfds.download.ComputeStatsMode.SKIP
    )
  )
  return builder
