"""Full blocks when the heads do not divide over CP (as OSP-Next runs them): Ulysses over gcd(heads, CP) ranks,
keys and values gathered from the other runs of ranks; velocity, loss and every gradient equal the single-process
run (fp32, gloo), on a padded grid."""
import pytest

from osp_megatron.config import ModelConfig

from test_equivalence import _check, _run, write_reference


def _model(heads):
    return ModelConfig(size="tiny", schedule="dual_end", num_full_blocks=4, num_attention_heads=heads,
                       hidden_size=16 * heads, sparse_ratio=2)


def test_three_heads_over_ssp2_gather_every_key(tmp_path):
    # gcd(3, 2) = 1: no all-to-all in full blocks, each rank's queries attend the keys gathered from both ranks
    ref = write_reference(_model(3), tmp_path / "ref.pt")
    results = _run(ref, 2, ["ssp2:ssp=2", "ssp2_packed:ssp=2,padding_free=true"], tmp_path)
    assert set(results) == {"ssp2", "ssp2_packed"}
    _check(results)


@pytest.mark.slow
def test_six_heads_over_cp4_run_ulysses_at_gcd_2(tmp_path):
    # gcd(6, 4) = 2: Ulysses over pairs of ranks, keys and values gathered over the two pairs
    ref = write_reference(_model(6), tmp_path / "ref.pt")
    _check(_run(ref, 4, ["ssp2_ulysses2:ssp=2,ulysses=2", "ssp4:ssp=4"], tmp_path))
