"""hbat.trainer.stats: Student t quantiles, the t-interval of a mean over seeds and the paired t-test, against
scipy where it is installed and against values worked out by hand (and printed t tables) everywhere."""
import math

import pytest

from hbat.trainer.stats import betainc, mean_interval, paired_difference, t_cdf, t_quantile

# t_{0.975, df} from printed tables (and scipy.stats.t.ppf), to the digits given
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 9: 2.262157163, 30: 2.042272456,
        1000: 1.962339081}


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_tables(df):
    assert t_quantile(0.975, df) == pytest.approx(T975[df], abs=1e-8)
    assert t_quantile(0.025, df) == pytest.approx(-T975[df], abs=1e-8)
    assert t_cdf(T975[df], df) == pytest.approx(0.975, abs=1e-10)


def test_t_cdf_closed_forms():
    # df = 1 is the Cauchy distribution, df = 2 has F(t) = 1/2 + t / (2 sqrt(t^2 + 2))
    for t in (-3.0, -0.4, 0.0, 0.7, 5.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), abs=1e-12)
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 6x^2 - 8x^3 + 3x^4 at 0.4
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 7, 12, 50):
        for p in (0.6, 0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)
    a, b = [0.71, 0.74, 0.69, 0.75, 0.70], [0.52, 0.61, 0.55, 0.66, 0.58]
    assert paired_difference(a, b).p_value == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-8)


def test_mean_interval_by_hand():
    # mean 0.712, squared deviations sum to 0.00148, half-width = t_{0.975,4} * sqrt(0.00148 / 4) / sqrt(5)
    iv = mean_interval([0.70, 0.74, 0.69, 0.72, 0.71])
    assert iv.mean == pytest.approx(0.712)
    assert iv.half_width == pytest.approx(2.776445105 * math.sqrt(0.00148 / 4) / math.sqrt(5), rel=1e-9)
    assert iv.half_width == pytest.approx(0.0238839, abs=1e-6)
    assert (iv.low, iv.high, iv.n) == (pytest.approx(0.712 - iv.half_width), pytest.approx(0.712 + iv.half_width), 5)
    one = mean_interval([0.5])
    assert (one.mean, one.low, one.high, one.half_width) == (0.5, None, None, None)
    with pytest.raises(ValueError):
        mean_interval([])


def test_paired_difference_by_hand():
    # differences 1, 1.5, -0.3, 2, 1: mean 1.04, sd sqrt(2.932 / 4) = 0.85615, t = 1.04 / (0.85615 / sqrt 5) = 2.7162;
    # df 4, where F(t) = 1/2 + (3/4) x (1 - x^2 / 3) with x = t / sqrt(t^2 + 4): p = 2 (1 - F) = 0.0531937
    iv = paired_difference([1, 2, 3, 4, 5], [0, 0.5, 3.3, 2, 4])
    sd = math.sqrt(sum((d - 1.04) ** 2 for d in (1, 1.5, -0.3, 2, 1)) / 4)
    assert iv.mean == pytest.approx(1.04)
    assert iv.half_width == pytest.approx(2.776445105 * sd / math.sqrt(5))
    assert iv.low < 0 < iv.high and not iv.excludes_zero          # |t| = 2.716 < 2.776: not significant
    assert iv.p_value == pytest.approx(0.0531937, abs=1e-7)        # just above 0.05, as the interval says
    strong = paired_difference([0.80, 0.82, 0.78, 0.81, 0.79], [0.70, 0.73, 0.69, 0.70, 0.70])
    assert strong.excludes_zero and strong.low > 0 and strong.p_value < 0.001
    # the same shift on every seed: zero width, significant; no shift: not
    same = paired_difference([0.6, 0.7, 0.8], [0.5, 0.6, 0.7])
    assert same.half_width == pytest.approx(0.0, abs=1e-12) and same.excludes_zero and same.p_value == 0.0
    equal = paired_difference([0.6, 0.7], [0.6, 0.7])
    assert not equal.excludes_zero and equal.p_value == 1.0
    with pytest.raises(ValueError, match="one baseline value per value"):
        paired_difference([1, 2], [1])


def test_pairing_is_what_makes_a_consistent_gain_significant():
    """Seeds differ a lot, the gain on each seed is steady: the two means' intervals overlap, the paired one
    excludes 0."""
    base = [0.50, 0.70, 0.90, 0.60, 0.80]
    better = [b + 0.05 + e for b, e in zip(base, (0.01, -0.01, 0.0, 0.02, -0.02))]
    a, b = mean_interval(better), mean_interval(base)
    assert a.low < b.high  # overlapping intervals
    assert paired_difference(better, base).excludes_zero
