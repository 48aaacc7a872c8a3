"""Typed run configuration (schema.py) and its loading from YAML (load.py).

Every field carries a description; `s3ray config --explain` prints them. Unknown keys are errors
(a typo must not silently fall back to a default), and every error names the field path and the
allowed values before any model is loaded.
"""

from s3ray.config.load import config_from_dict, explain, load_config, parse_overrides
from s3ray.config.schema import *
from s3ray.config.schema import ConfigError, S3Config

__all__ = ["ConfigError", "S3Config", "config_from_dict", "explain", "load_config", "parse_overrides"]
