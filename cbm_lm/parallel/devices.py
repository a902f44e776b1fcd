"""Per-chip peak FLOP/s and HBM bytes, looked up by jax ``device_kind``."""

from __future__ import annotations

# Peak dense bf16 FLOP/s per chip, by jax device_kind prefix (vendor data sheets).
# Prefixes are tried in order: jax names a v5e "TPU v5 lite" and a v5p "TPU v5",
# so the lite entries come before the bare "TPU v5".
PEAK_FLOPS = {
    "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12,
    "TPU v6": 918e12, "TPU v4": 275e12,
    "NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12,
    "cpu": 1e11,  # nominal: a few AVX cores; MFU on CPU is only indicative
}

GiB = 1024 ** 3

# High-bandwidth memory per chip, bytes, by the same device_kind prefixes.
HBM_BYTES = {
    "TPU v5p": 95 * GiB, "TPU v5 lite": 16 * GiB, "TPU v5e": 16 * GiB, "TPU v5": 95 * GiB,
    "TPU v6": 32 * GiB, "TPU v4": 32 * GiB,
    "NVIDIA H200": 141 * GiB, "NVIDIA H100": 80 * GiB, "NVIDIA A100": 80 * GiB,
}


def _lookup(table: dict, device_kind: str):
    for prefix, value in table.items():
        if device_kind.lower().startswith(prefix.lower()):
            return value
    return None


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float:
    if override:
        return override
    found = _lookup(PEAK_FLOPS, device_kind)
    return PEAK_FLOPS["cpu"] if found is None else found


def hbm_bytes_per_device(device_kind: str) -> int | None:
    """HBM bytes of one chip of ``device_kind``; None when not in the table (e.g. cpu)."""
    return _lookup(HBM_BYTES, device_kind)
