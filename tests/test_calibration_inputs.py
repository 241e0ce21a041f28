"""Issue 13 re-test, point 4: raw NO2 inputs outside their physical ranges are not derived.

The calibration door bounds a *sheet* by trying it over the ADC's range (ADS1115, +-6.144 V)
and the board's temperatures (-40..85 C); nothing bounded the raw inputs it is then applied
to: ``no2_we_mv`` = 1e15 stored 3.86e15 ppb, ``no2_temp_c`` = 1e14 with a temperature
coefficient of 1e3 stored 1e17 ppb, and the upload was ``stored``. Now the receiver's
recompute refuses such a sample (no derived value, counted in ``no2_inputs_out_of_range``);
the sample is kept with its raw values, and in-range samples of the same batch are derived.
Both stores, through the ingest path (tests/test_store_contract.py's ``make``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from core.calibration_rules import ADC_FULL_SCALE_MV, TEMP_RANGE_C, check_record
from receiver.ingest import Ingestor
from tests.pg import pg_cluster  # noqa: F401
from tests.test_calibration import T0, _cal_sample, _no2_sample
from tests.test_calibration_identity import _record, _upload
from tests.test_store_contract import MakeStore, make, q  # noqa: F401
from core.wire import Batch

OUT = [  # the tester's, and just past each edge
    {"no2_we_mv": 1e15}, {"no2_we_mv": -1e15, "no2_ae_mv": 1e15}, {"no2_temp_c": 1e14},
    {"no2_we_mv": 6144.0, "no2_ae_mv": -6144.0, "no2_temp_c": 1e6},
    {"no2_we_mv": ADC_FULL_SCALE_MV + 1}, {"no2_ae_mv": -ADC_FULL_SCALE_MV - 1},
    {"no2_temp_c": TEMP_RANGE_C[0] - 0.5}, {"no2_temp_c": TEMP_RANGE_C[1] + 0.5},
]
EDGE = {"no2_we_mv": ADC_FULL_SCALE_MV, "no2_ae_mv": -ADC_FULL_SCALE_MV, "no2_temp_c": TEMP_RANGE_C[1]}


@pytest.mark.parametrize("raw", OUT, ids=[json.dumps(r) for r in OUT])
def test_out_of_range_inputs_are_not_derived(make: MakeStore, tmp_path: Path, raw: dict[str, float]) -> None:  # noqa: F811
    s = make()
    rec = _record(tmp_path, "van-a", temp_coef_ppb_per_c=1e3)
    check_record(rec.to_json())  # a sheet the door accepts
    samples = [_cal_sample(1, T0, rec), _no2_sample(2, T0 + 2, 320.0, cal=rec.id),
               _no2_sample(3, T0 + 3, 320.0, cal=rec.id)]
    samples[2].values.update(EDGE)  # type: ignore[union-attr]  # on the edges: still derived
    for i in range(4, 7):
        smp = _no2_sample(i, T0 + i, 320.0, cal=rec.id)
        smp.values.update(raw)  # type: ignore[union-attr]
        samples.append(smp)
    status = _upload(Ingestor(s), "van-a", Batch("van-a", "e1", 1, 6, samples))
    derived = dict(q(s, "SELECT seq, value FROM derived WHERE device=? AND quantity='no2_ppb'", "van-a"))
    kept = {seq: json.loads(v) if isinstance(v, str) else v
            for seq, v in q(s, "SELECT seq, vals FROM samples WHERE device=? AND sensor='no2'", "van-a")}
    counts = s.counts()
    print(f"\n{raw}: upload {status}; derived {derived}; out of range {counts.get('no2_inputs_out_of_range')}")
    assert status == "stored"
    assert set(derived) == {2, 3} and all(math.isfinite(v) and abs(v) < 1e7 for v in derived.values())
    assert counts["no2_inputs_out_of_range"] >= 3  # per derivation tried (a recompute tries again)
    for seq in (4, 5, 6):  # kept as it came, raw values and all
        assert all(kept[seq][k] == v for k, v in raw.items())
