"""The conformance repository's variants, shared by conftest.py and the tests (imported by file name)."""

from __future__ import annotations

# name -> make_model_repository keyword arguments (versions: written once per version number)
VARIANTS: dict[str, dict] = {
    "resnet20": {},  # the defaults: max_batch_size 32, dynamic batching, zero warmup, latest:1, labels
    "nobatch": {"dynamic_batching": False},
    "mbs0": {"max_batch_size": 0},
    "queue": {"preferred_batch_sizes": (4, 8), "max_queue_delay_us": 500, "max_queue_size": 16, "queue_timeout_us": 10_000_000},
    "instances": {"instances": 2, "kind": "KIND_CPU", "warmup": "random"},
    "trt_accelerator": {"trt_accelerator": True},  # the option applies to GPU instances; CPU instances ignore it
    "nowarmup": {"warmup": "none"},
    "latest2": {"version_policy": "latest:2", "versions": (1, 2, 3)},
    "all": {"version_policy": "all", "versions": (1, 2, 3)},
    "specific": {"version_policy": "specific:1,3", "versions": (1, 3), "extra_versions": (2,)},
    "counted": {"warmup": "none"},  # statistics tests only: no other traffic
}
# versions each variant serves (Triton's rules for its version_policy)
SERVED = {"latest2": ["2", "3"], "all": ["1", "2", "3"], "specific": ["1", "3"]}
