"""s3ray: Synthesis Step by Step on Ray.

A teacher LLM writes a seed dataset, a student trains on it, the student's errors on a small real
validation set go back to the teacher, which writes examples like each error; repeat.
"""

__version__ = "0.1.0"
