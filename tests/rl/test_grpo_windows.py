"""Window schedules, the MixGRPO-Flash grid and NFE accounting."""
import pytest
import torch

from osp_megatron.diffusion.samplers import flow_sigmas, shift_sigmas
from osp_megatron.rl.windows import Window, WindowSchedule, count_nfe, flash_sigmas, group_prefix_runs, window_history


def test_fixed_window():
    s = WindowSchedule("fixed", size=10, num_steps=25, start=0)
    assert all(s.window(i) == Window(0, 10) for i in range(50))
    assert s.window(3).steps == tuple(range(10))


def test_progressive_by_hand_with_roll_back():
    # steps 10 -> limit 8, size 3 -> starts 0..5; shift every 2 iterations by 2
    s = WindowSchedule("progressive", size=3, num_steps=10, shift_interval=2, stride=2, roll_back=True)
    assert s.limit == 8 and s.max_start == 5
    assert window_history(s, 12) == [0, 0, 2, 2, 4, 4, 0, 0, 2, 2, 4, 4]


def test_progressive_clamps_without_roll_back():
    s = WindowSchedule("progressive", size=3, num_steps=10, shift_interval=1, stride=1, roll_back=False)
    assert window_history(s, 9) == [0, 1, 2, 3, 4, 5, 5, 5, 5]


def test_progressive_mixgrpo_defaults():
    """MixGRPO: 25 steps, w=4, interval 25, stride 1 -> start k at iterations [25k, 25k+25); limit 23."""
    s = WindowSchedule("progressive", size=4, num_steps=25, shift_interval=25, stride=1)
    assert s.window(0) == Window(0, 4) and s.window(24) == Window(0, 4)
    assert s.window(25) == Window(1, 4) and s.window(299) == Window(11, 4)
    assert s.window(25 * 19) == Window(19, 4)  # last full window inside [0, 23)
    assert s.window(25 * 20) == Window(0, 4)  # rolled back
    assert all(w.end <= 23 for w in (s.window(i) for i in range(0, 1000, 7)))


def test_stride_zero_freezes():
    s = WindowSchedule("progressive", size=4, num_steps=25, shift_interval=1, stride=0)
    assert set(window_history(s, 30)) == {0}


def test_random_window_is_seeded_and_in_range():
    a = WindowSchedule("random", size=4, num_steps=25, seed=3)
    b = WindowSchedule("random", size=4, num_steps=25, seed=3)
    starts = window_history(a, 200)
    assert starts == window_history(b, 200)
    assert min(starts) == 0 and max(starts) == 19 and len(set(starts)) == 20
    assert window_history(WindowSchedule("random", size=4, num_steps=25, seed=4), 200) != starts


def test_trained_steps_subset():
    s = WindowSchedule("fixed", size=6, num_steps=25, start=2, trained_steps=3)
    assert s.trained_steps(0) == (2, 3, 4)
    r = WindowSchedule("fixed", size=24, num_steps=25, limit=24, trained_steps=14, trained_select="random", seed=1)
    picks = [r.trained_steps(i) for i in range(5)]
    assert all(len(p) == 14 and len(set(p)) == 14 and set(p) <= set(range(24)) for p in picks)
    assert len(set(picks)) > 1 and picks[0] == r.trained_steps(0)


def test_schedule_rejects_bad_windows():
    with pytest.raises(ValueError, match="size"):
        WindowSchedule("fixed", size=30, num_steps=25)
    with pytest.raises(ValueError, match="start"):
        WindowSchedule("fixed", size=4, num_steps=25, start=20)
    with pytest.raises(ValueError, match="strategy"):
        WindowSchedule("sliding", size=4, num_steps=25)


def test_check_state_detects_changed_schedule():
    s = WindowSchedule("progressive", size=4, num_steps=25, shift_interval=25)
    s.check_state(s.state_dict())
    other = WindowSchedule("progressive", size=4, num_steps=25, shift_interval=20)
    with pytest.raises(ValueError, match="window schedule differs"):
        other.check_state(s.state_dict())


@pytest.mark.parametrize("compression,post_steps", [(0.4, 7), (0.2, 3)])
def test_flash_grid_definition(compression, post_steps):
    """Window 0-3 of 25: L=3, num_post=int(22*ratio) points -> Flash 7 DPM steps, Flash* 3 (MixGRPO's NFE)."""
    steps, shift = 25, 3.0
    grid, dpm_from = flash_sigmas(steps, shift, Window(0, 4), compression)
    base = flow_sigmas(steps, shift)
    assert dpm_from == 4
    assert torch.equal(grid[:5], base[:5])  # original grid kept up to the window end
    assert len(grid) - 1 - dpm_from == post_steps
    expect_post = shift_sigmas(torch.linspace(1 - 4 / 25, 0, post_steps + 1, dtype=torch.float64), shift)
    assert torch.allclose(grid[4:], expect_post)  # continuous at the junction, shifted linspace after
    assert grid[-1] == 0 and bool(torch.all(grid[1:] < grid[:-1]))


def test_flash_grid_moved_window():
    grid, dpm_from = flash_sigmas(25, 3.0, Window(10, 4), 0.4)
    assert dpm_from == 14 and len(grid) - 1 - 14 == int((25 - 13) * 0.4) - 1
    assert torch.equal(grid[:15], flow_sigmas(25, 3.0)[:15])


def test_nfe_counts():
    # MixGRPO: 25 rollout NFE + 4 trained; DanceGRPO-style: 25 + 14; Flash: 4 SDE + 7 DPM + 4 trained
    mix = count_nfe(25, Window(0, 4), 4, None, cfg_scale=1.0, kl=False, samples=12)
    assert (mix.rollout_per_sample, mix.per_sample, mix.per_iteration) == (25, 29, 29 * 12)
    dance = count_nfe(25, Window(0, 24), 14, None, cfg_scale=1.0, kl=False, samples=12)
    assert dance.per_sample == 39
    flash = count_nfe(25, Window(0, 4), 4, 7, cfg_scale=1.0, kl=False, samples=12)
    assert flash.per_sample == 15
    moved = count_nfe(25, Window(5, 4), 4, None, cfg_scale=5.0, kl=True, samples=2)
    assert moved.as_dict()["nfe_per_iteration"] == (25 + 4 + 4) * 2 * 2


def test_nfe_with_group_shared_prefix():
    # window at 11 of 25, 2 prompts x G=12 on 2 DP ranks: each rank holds one whole group -> 2 prefix runs
    assert group_prefix_runs(24, 12, 2) == 2
    assert group_prefix_runs(24, 12, 3) == 4  # groups split over ranks run once per rank: {0}, {0, 1}, {1}
    n = count_nfe(25, Window(11, 4), 4, None, cfg_scale=1.0, kl=False, samples=24, prefix_runs=2)
    assert n.per_iteration == 11 * 2 + (4 + 10 + 4) * 24
    assert n.per_sample == 29  # MixGRPO's per-sample accounting is unchanged
