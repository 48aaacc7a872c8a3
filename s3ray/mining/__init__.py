"""Error mining: the student's mistakes on the real validation set (S3 step 4), with Ray Data."""

from s3ray.mining.errors import MiningResult, macro_f1_from_counts, mine_errors, read_rows

__all__ = ["MiningResult", "macro_f1_from_counts", "mine_errors", "read_rows"]
