"""Dense counterpart of configs/mlp_fmnist.py."""
from configs import base, mlp_fmnist


def get_config():
  return base.dense(mlp_fmnist.get_config())
