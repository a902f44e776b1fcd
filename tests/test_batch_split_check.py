"""train() refuses a data.batch_size that does not split over the mesh's batch shards (or
whose micro-batches do not), naming the fields and the mesh, before writing anything."""

import pytest

from cbm_lm.config import ConfigError
from cbm_lm.default_config import base_config
from cbm_lm.train.loop import train


def _config(batch: int, accum: int, data: int):
    c = base_config()
    c.data.batch_size, c.train.grad_accum_steps = batch, accum
    c.mesh.data, c.mesh.fsdp = data, -1     # 8 simulated devices (conftest.py)
    c.data.dir = "/nonexistent/corpus"      # never read: the check comes first
    return c


@pytest.mark.parametrize("batch,accum,data,need", [
    (6, 1, 4, 8),     # 6 rows over 8 batch shards (data=4 x fsdp=2)
    (8, 4, 4, 32),    # divides over the shards, but its 4 micro-batches of 2 rows do not
])
def test_indivisible_batch_is_refused_before_anything_is_written(tmp_path, batch, accum, data,
                                                                  need):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        train(_config(batch, accum, data), str(workdir))
    msg = str(e.value)
    for s in (f"data.batch_size={batch}", f"train.grad_accum_steps={accum}", f"mesh data={data}",
              f"mesh fsdp={8 // data}", f"multiple of {need}"):
        assert s in msg, (s, msg)
    assert not workdir.exists()
    assert list(tmp_path.iterdir()) == []


def test_divisible_batch_passes_the_check(tmp_path):
    """batch 16, accum 2, data 4 x fsdp 2: micro-batches of 8 over 8 shards. The run goes on to
    the corpus (absent here), past the check."""
    with pytest.raises(Exception) as e:
        train(_config(16, 2, 4), str(tmp_path / "run"))
    assert "data.batch_size" not in str(e.value)
