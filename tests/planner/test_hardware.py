from types import SimpleNamespace

import pytest

from flashfx.planner import hardware
from flashfx.planner.hardware import KNOWN


def test_table_has_the_gpus_users_have():
    for name in ("A100", "A10", "L4", "RTX 4090", "H100", "H200", "B200"):
        g = KNOWN[name]
        assert g.smem_per_block <= g.smem_per_sm and g.sm_count > 0 and g.flops("bf16") > 0
    assert KNOWN["H200"].smem_per_block == 227 * 1024 and KNOWN["H200"].sm_count == 132
    assert KNOWN["A10"].smem_per_block == 99 * 1024


@pytest.mark.parametrize("device,key", [("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A10", "A10"),
                                        ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100 PCIe"),
                                        ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("NVIDIA H200", "H200")])
def test_lookup_by_driver_name(device, key):
    assert hardware.lookup(device) is KNOWN[key]


def _props(**kw):
    base = dict(name="NVIDIA H200", major=9, minor=0, multi_processor_count=132)
    return SimpleNamespace(**(base | kw))


def test_from_properties_merges_device_and_table():
    g = hardware.from_properties(_props(shared_memory_per_block_optin=232448, L2_cache_size=60 << 20))
    assert g.smem_per_block == 232448 and g.l2_bytes == 60 << 20
    assert g.hbm_bytes_per_s == KNOWN["H200"].hbm_bytes_per_s  # the driver cannot say this


def test_from_properties_of_older_torch_and_unknown_gpu():
    # torch 2.11 may lack the newer attributes; an unknown name falls back to its architecture
    g = hardware.from_properties(_props(name="NVIDIA Future GPU", multi_processor_count=100))
    assert g.smem_per_block == 227 * 1024 and g.regs_per_sm == 65536 and g.flops("bf16") > 0


def test_override_and_env(monkeypatch):
    with hardware.overridden("A10", sm_count=10) as g:
        assert hardware.current() is g and g.sm_count == 10
    monkeypatch.setenv("FLASHFX_GPU", "L4")
    assert hardware.current().name == "L4"
    with pytest.raises(KeyError):
        hardware.override("no such gpu")
