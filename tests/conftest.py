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

# Many tests compile the same tiny train steps (resume, 1 vs 8 devices, quick start seeds):
# XLA's persistent cache turns the repeats into cache hits (about 50 s -> 10 s per tiny run on
# 2 cores). Keyed by the compiled program, so a stale entry can never be used for changed code.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("CLDRO_JAX_TEST_JIT_CACHE", "/tmp/cldro_jax_test_jit_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
