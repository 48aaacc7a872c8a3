"""Process-wide setup: the local Ray cluster's workers and core counts."""

import logging

from s3ray.runtime import _STATE_API_LOGGERS, cap_to_local_cores, local_cores, one_node


def test_workers_of_a_local_cluster_do_not_poll_warnings_about_the_missing_state_api(ray_local):
    """A local cluster has no dashboard, so Ray Train's placement-group cleaner would warn once a second for a
    whole training run; the worker setup hook raises that logger to ERROR in every worker."""

    @ray_local.remote(num_cpus=0)
    def levels() -> list[int]:
        return [logging.getLogger(name).getEffectiveLevel() for name in _STATE_API_LOGGERS]

    assert ray_local.get(levels.remote()) == [logging.ERROR] * len(_STATE_API_LOGGERS)


def test_a_one_node_cluster_caps_threads_at_the_real_cores(ray_local):
    assert one_node()
    assert cap_to_local_cores(10_000) == local_cores() >= 1
    assert cap_to_local_cores(1) == 1
