"""Test setup: 8 simulated CPU devices, so sharded results can be compared
with single-device results (DESIGN.md section 8)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
