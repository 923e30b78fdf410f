"""Test setup: 8 host devices for the sharding tests; everything else uses a 1-device mesh.

XLA_FLAGS must be set before jax is imported anywhere, so it lives here.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

assert jax.device_count() == 8, "tests/conftest.py must run before jax is imported"
