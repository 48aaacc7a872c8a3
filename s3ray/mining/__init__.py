"""Error mining: the student's mistakes on the real validation set (S3 step 4), with Ray Data."""

from s3ray.mining.mine import MiningResult, mine_errors
from s3ray.mining.read import read_dataset, read_errors

__all__ = ["MiningResult", "mine_errors", "read_dataset", "read_errors"]
