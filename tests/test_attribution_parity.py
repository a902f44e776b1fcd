"""Input attribution against Steerling's own integrated gradients
(steerling.attribution.OutputToInputAttributor) on an imported tiny random
checkpoint: same snapshot, same targets, MASK baseline, same n_steps."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("steerling.attribution")

import jax.numpy as jnp  # noqa: E402
from steerling.attribution import OutputToInputAttributor  # noqa: E402

from cbm_lm.attribution.integrated_gradients import LogitQuery, integrated_gradients  # noqa: E402
from cbm_lm.interop import import_steerling  # noqa: E402
from steerling_fixtures import VOCAB, make_steerling, save_steerling  # noqa: E402

pytestmark = pytest.mark.parity


@pytest.mark.parametrize("n_steps", [1, 8])
def test_ig_matches_steerling(tmp_path, n_steps):
    ref_model, cfg, ccfg = make_steerling({}, {}, seed=4)
    save_steerling(ref_model, cfg, ccfg, str(tmp_path / "ckpt"))
    model, _ = import_steerling(str(tmp_path / "ckpt"))
    rng = np.random.default_rng(0)
    snap = rng.integers(0, VOCAB - 1, (24,)).astype(np.int64)
    snap[[14, 17, 18, 21]] = VOCAB - 1                 # a partially masked diffusion snapshot
    positions = np.asarray([14, 17, 21])
    targets = rng.integers(0, VOCAB - 1, 3)
    ids = np.repeat(snap[None], 3, 0)

    ref = OutputToInputAttributor.from_backbone(ref_model, "mask", mask_token_id=VOCAB - 1)
    want = ref.compute(torch.from_numpy(ids), torch.from_numpy(targets),
                       torch.from_numpy(positions), n_steps=n_steps).attributions.numpy()
    got = integrated_gradients(model, LogitQuery(jnp.asarray(ids, jnp.int32),
                                                 jnp.asarray(positions, jnp.int32),
                                                 jnp.asarray(targets, jnp.int32)),
                               n_steps=n_steps, batch_size=4)
    scale = np.abs(want).max()
    assert scale > 1e-2
    np.testing.assert_allclose(np.asarray(got.attributions), want, atol=2e-4 * max(1, scale))
    assert np.all(want[:, snap == VOCAB - 1] == 0) and np.all(
        np.asarray(got.attributions)[:, snap == VOCAB - 1] == 0)
