from receiver.positions import EXACT, INTERPOLATED, NO_FIX, PENDING, Fix, locate

FIXES = [Fix(0, 52.0, 4.0, 10.0, 1), Fix(2000, 52.002, 4.004, 12.0, 1), Fix(30000, 52.1, 4.1, 5.0, 2)]
TIMES = [f.t_utc_ms for f in FIXES]


def test_exact_and_interpolated():
    p = locate(FIXES, TIMES, 2000, 10000, 40000)
    assert p.state == EXACT and (p.lat, p.lon) == (52.002, 4.004)
    p = locate(FIXES, TIMES, 500, 10000, 40000)
    assert p.state == INTERPOLATED
    assert abs(p.lat - 52.0005) < 1e-12 and abs(p.lon - 4.001) < 1e-12
    assert abs(p.speed_mps - 10.5) < 1e-12


def test_gap_too_long_is_flagged_not_guessed():
    p = locate(FIXES, TIMES, 15000, 10000, 40000)
    assert p.state == NO_FIX and p.lat is None


def test_before_first_fix_and_after_last():
    assert locate(FIXES, TIMES, -500, 10000, 40000).state == NO_FIX
    # after the newest fix, while the stream may still bring the next one: pending
    assert locate(FIXES, TIMES, 31000, 10000, 35000).state == PENDING
    # the stream went on for longer than the gap without a fix: no fix
    assert locate(FIXES, TIMES, 31000, 10000, 45000).state == NO_FIX
    assert locate([], [], 1000, 10000, 1000).state == PENDING
