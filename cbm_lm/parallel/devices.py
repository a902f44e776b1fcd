"""Per-chip peak FLOP/s and HBM bytes, looked up by jax ``device_kind``."""

from __future__ import annotations

from absl import logging

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


_warned_unknown: set[str] = set()


def known_peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
    """Peak FLOP/s of one chip: ``override`` (hardware.peak_flops_per_device) when set,
    else the table's; None for a device kind not in the table (no made-up number, so
    the train loop logs no ``mfu``), with a warning once per kind."""
    if override:
        return override
    found = _lookup(PEAK_FLOPS, device_kind)
    if found is None and device_kind not in _warned_unknown:
        _warned_unknown.add(device_kind)
        logging.warning(
            "no peak FLOP/s known for device kind %r (parallel/devices.py PEAK_FLOPS) and "
            "hardware.peak_flops_per_device is 0: the train loop logs no mfu/hfu and the "
            "planners assume the CPU's nominal %g FLOP/s; set "
            "--config.hardware.peak_flops_per_device to the chip's peak dense FLOP/s",
            device_kind, PEAK_FLOPS["cpu"])
    return found


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float:
    """``known_peak_flops_per_device``, falling back to the CPU's nominal figure for a
    kind not in the table (the planners, which need a number; warned once)."""
    found = known_peak_flops_per_device(device_kind, override)
    return PEAK_FLOPS["cpu"] if found is None else found


def hbm_bytes_per_device(device_kind: str) -> int | None:
    """HBM bytes of one chip of ``device_kind``; None when not in the table (e.g. cpu)."""
    return _lookup(HBM_BYTES, device_kind)
