r"""Centralized MAE / UltraMIM pretraining: the federated job's code path with one pooled client.

Launch (paper preset, ViT-B/16 at 224, all 16 phantom clients' images pooled, 300 epochs):
  python -m ultrajax.main --config=configs/pretrain_central.py --workdir=$WORKDIR
On CPU:
  python -m ultrajax.main --config=configs/pretrain_central.py:cpu --workdir=/tmp/mae_cpu
Plain MAE instead of UltraMIM: --config.ultramim.tgm_mode=random --config.ultramim.mic=False
--config.ultramim.smat=False.

One "round" is one epoch over the pooled data; the batch is `data.batch_size` x the number of
clients of the federated preset, so the two jobs compare at the same total batch.
"""
import pathlib

from ultrajax import configlib


def get_config(arg=None):
  fed = configlib.load_config_module(pathlib.Path(__file__).with_name("pretrain_fed.py"))
  c = fed.get_config(arg)
  c.data.pool_clients = True
  c.data.batch_size *= c.data.num_clients
  c.fed.strategy = "central"  # FedAvg's arithmetic on one pooled client
  return c
