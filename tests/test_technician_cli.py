"""The technician's commands, end to end against the simulated van (CliRunner)."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge.calibration import CalibrationStore
from edge.technician import technician_group
from simulator.broker import free_port

SERIAL = "202-SIM-0001"


@pytest.fixture
def cli():
    runner = CliRunner()
    group = technician_group()

    def run(*args: str, input: str | None = None):
        return runner.invoke(group, list(args), input=input, catch_exceptions=False)

    return run


@pytest.fixture
def van(tmp_path: Path):
    """Options for a simulated van whose data lives in tmp_path."""
    return ["--simulate", "--data-dir", str(tmp_path / "data")]


def records(tmp_path: Path) -> list:
    with CalibrationStore.for_data_dir(tmp_path / "data") as s:
        return s.history()


def write_config(tmp_path: Path, port: int) -> str:
    p = tmp_path / "agent.toml"
    p.write_text(f'[device]\nid = "van-042"\ndata_dir = "{tmp_path / "data"}"\n'
                 f'[uplink]\nhost = "127.0.0.1"\nport = {port}\n')
    return str(p)


# -- selftest ------------------------------------------------------------------------------

def test_selftest_passes_on_the_simulator(cli, tmp_path, mosquitto):
    r = cli("selftest", "--config", write_config(tmp_path, mosquitto.port), "--simulate", "--json")
    res = json.loads(r.output)
    assert r.exit_code == 0, r.output
    names = {c["name"]: c["status"] for c in res["checks"]}
    assert names["broker"] == "PASS" and names["clock"] == "PASS" and names["buffer"] == "PASS"
    assert names["sensor pm"] == names["sensor no2"] == names["gps gps"] == names["sensor noise"] == "PASS"


def test_selftest_fails_with_exit_1_when_the_broker_is_unreachable(cli, tmp_path):
    r = cli("selftest", "--config", write_config(tmp_path, free_port()), "--simulate", "--skip", "gps")
    assert r.exit_code == 1
    assert "broker" in r.output and "FAIL" in r.output and "unreachable" in r.output


def test_selftest_config_error_is_exit_2(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[uplink]\nport = 0\n")
    r = cli("selftest", "--config", str(bad))
    assert r.exit_code == 2 and "uplink.port" in r.output
    r = cli("selftest", "--config", str(tmp_path / "missing.toml"))
    assert r.exit_code == 2


# -- live ----------------------------------------------------------------------------------

def test_live_once_prints_every_channel(cli, van):
    r = cli("live", "--once", *van)
    assert r.exit_code == 0, r.output
    for word in ("pm", "no2_ppb", "laeq", "gps", "live (simulated)"):
        assert word in r.output


# -- NO2 -----------------------------------------------------------------------------------

def test_zero_accepts_a_stable_signal_and_refuses_a_drifting_one(cli, van, tmp_path):
    r = cli("no2", "zero", "--minutes", "5", "--sim-drift", "1.0", "--yes", *van)
    assert r.exit_code == 1 and "not stable" in r.output and "Nothing was changed" in r.output
    assert records(tmp_path) == []

    r = cli("no2", "zero", "--minutes", "5", "--sim-offset", "4.0", "--yes", *van)
    assert r.exit_code == 0, r.output
    (rec,) = records(tmp_path)
    assert rec.id == f"no2:{SERIAL}:v1" and rec.method == "zero" and rec.status == "active"
    assert math.isclose(rec.values["intercept_ppb"], -4.0, abs_tol=0.5)


def test_span_sets_the_slope_keeping_the_zero(cli, van, tmp_path):
    assert cli("no2", "zero", "--minutes", "5", "--yes", *van).exit_code == 0
    r = cli("no2", "span", "--ppb", "200", "--sim-gain", "0.8", "--yes", *van)
    assert r.exit_code == 0, r.output
    zero, span = records(tmp_path)
    assert zero.status == "superseded" and span.status == "active" and span.supersedes == zero.id
    assert math.isclose(span.values["slope"], 1 / 0.8, rel_tol=0.02)
    # a span gas that is not there (gain x0.1) is refused
    r = cli("no2", "span", "--ppb", "200", "--sim-gain", "0.1", "--yes", *van)
    assert r.exit_code == 1 and len(records(tmp_path)) == 2


def test_confirmation_is_required(cli, van, tmp_path):
    r = cli("no2", "algorithm", "3", *van, input="n\n")
    assert r.exit_code == 1 and "nothing was changed" in r.output
    r = cli("no2", "algorithm", "3", *van, input="")  # no answer at all (EOF) is no
    assert r.exit_code != 0
    assert records(tmp_path) == []
    r = cli("no2", "algorithm", "3", *van, input="y\n")
    assert r.exit_code == 0 and records(tmp_path)[0].values["algorithm"] == 3


def test_pending_then_confirm(cli, van, tmp_path):
    r = cli("no2", "algorithm", "3", "--pending", *van)
    assert r.exit_code == 0 and "pending" in r.output
    (rec,) = records(tmp_path)
    assert rec.status == "pending"
    assert cli("calibration", "confirm", rec.id, "--yes", *van).exit_code == 0
    assert records(tmp_path)[0].status == "active"
    r = cli("calibration", "show", rec.id, *van)
    assert r.exit_code == 0 and "values.algorithm" in r.output
    r = cli("calibration", "history", "--serial", SERIAL, *van)
    assert r.exit_code == 0 and rec.id in r.output
    assert cli("calibration", "show", "no2:x:v9", *van).exit_code == 1


def test_sheet_import_checks_the_serial(cli, van, tmp_path):
    sheet = tmp_path / "sheet.csv"
    sheet.write_text(f"Serial,{SERIAL}\nWEe,296\nAEe,301\nWEo,10\nAEo,5\nSensitivity,-0.36\nGain,-0.73\n")
    other = tmp_path / "other.csv"
    other.write_text("Serial,202999999\nWEe,296\nAEe,301\nWEo,10\nAEo,5\nSensitivity,-0.36\nGain,-0.73\n")
    r = cli("no2", "sheet", "import", str(other), "--yes", *van)
    assert r.exit_code == 1 and "202999999" in r.output and records(tmp_path) == []
    r = cli("no2", "sheet", "import", str(sheet), "--yes", *van)
    assert r.exit_code == 0, r.output
    (rec,) = records(tmp_path)
    assert rec.method == "sheet" and rec.values["we_e_mv"] == 296 and rec.values["sensitivity_na_per_ppb"] == -0.36


# -- co-location ---------------------------------------------------------------------------

def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()


def _colocation_files(tmp_path: Path, hours: int, noise: float = 1.0):
    rng = np.random.default_rng(5)
    h0 = 1_795_000_000 // 3600 * 3600
    dev = 20 + 10 * np.sin(np.arange(hours) / 4.0)
    ref_ppb = 3.0 + 0.9 * dev + rng.normal(0, noise, hours)
    ref = tmp_path / "ref.json"
    data = [{"station_number": "NL10636", "formula": "NO2", "value": round(v * 1.9125, 3),
             "timestamp_measured": _iso(h0 + 3600 * (i + 1))} for i, v in enumerate(ref_ppb)]
    data.append({"station_number": "NL10636", "formula": "NO2", "value": 9999.0,
                 "timestamp_measured": _iso(h0 + 3600 * 3)})
    data.append(dict(data[2]))  # the revised value comes later and wins
    ref.write_text(json.dumps({"data": data}))
    d = tmp_path / "dev.csv"
    d.write_text("time,value\n" + "".join(f"{_iso(h0 + 3600 * i + 60 * m)},{dev[i]:.3f}\n"
                                          for i in range(hours) for m in range(0, 60, 5)))
    return str(ref), str(d)


def test_colocate_no2_accepts_a_good_fit_and_folds_it_in(cli, van, tmp_path):
    ref, dev = _colocation_files(tmp_path, 72)
    r = cli("colocate", "no2", "--reference", ref, "--device-data", dev, "--yes", *van)
    assert r.exit_code == 0, r.output
    assert "R²" in r.output and "accepted" in r.output
    (rec,) = records(tmp_path)
    assert rec.method == "colocation" and rec.values["fit_n"] == 72
    assert math.isclose(rec.values["slope"], 0.9, abs_tol=0.02)
    assert math.isclose(rec.values["intercept_ppb"], 3.0, abs_tol=0.6)


def test_colocate_rejects_too_few_hours(cli, van, tmp_path):
    ref, dev = _colocation_files(tmp_path, 24)
    r = cli("colocate", "no2", "--reference", ref, "--device-data", dev, "--yes", *van)
    assert r.exit_code == 1 and "rejected" in r.output and records(tmp_path) == []


def test_colocate_pm_from_the_receiver_store(cli, van, tmp_path):
    from receiver.store import SQLiteStore

    h0 = 1_795_000_000 // 3600 * 3600
    st = SQLiteStore(tmp_path / "datalab.sqlite")
    rows = []
    lines = ["station_number,formula,value,timestamp_measured"]
    for i in range(60):
        x = 8 + 6 * math.sin(i / 3.0)
        lines.append(f"NL10636,PM25,{1.0 + 0.7 * x:.3f},{_iso(h0 + 3600 * (i + 1))}")
        for m in range(0, 60, 10):
            rows.append(("van-001", "e", len(rows) + 1, "pm", int((h0 + 3600 * i + 60 * m) * 1000), 0, "gps", "b",
                         json.dumps({"pm25": x}), "", "b1", 0))
    st.conn.executemany("INSERT INTO samples VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    st.close()
    (tmp_path / "ref.csv").write_text("\n".join(lines) + "\n")
    r = cli("colocate", "pm", "--reference", str(tmp_path / "ref.csv"), "--store", str(tmp_path / "datalab.sqlite"),
            "--yes", *van)
    assert r.exit_code == 0, r.output
    (rec,) = records(tmp_path)
    assert rec.id == "pm:van-001/pm:v1" and math.isclose(rec.values["slope"], 0.7, abs_tol=1e-3)


# -- noise ---------------------------------------------------------------------------------

def test_noise_calibration_offset_and_refusal_off_1khz(cli, van, tmp_path):
    r = cli("noise", "calibrate", "--seconds", "4", "--sim-freq", "500", "--yes", *van)
    assert r.exit_code == 1 and "500 Hz" in r.output and records(tmp_path) == []
    r = cli("noise", "calibrate", "--seconds", "4", "--sim-error-db", "-1.3", "--yes", *van)
    assert r.exit_code == 0, r.output
    (rec,) = records(tmp_path)
    assert rec.method == "acoustic" and math.isclose(rec.values["offset_db"], 1.3, abs_tol=0.05)
    assert abs(rec.values["frequency_hz"] - 1000) < 2


def test_pm_humidity_epa(cli, van, tmp_path):
    r = cli("pm", "humidity", "--epa", "--yes", *van)
    assert r.exit_code == 0, r.output
    (rec,) = records(tmp_path)
    assert rec.method == "humidity" and rec.values["slope"] == 0.524
    assert cli("pm", "humidity", "--yes", *van).exit_code == 1  # neither --epa nor a formula


def test_every_command_has_help_with_examples(cli):
    for args in (["selftest"], ["live"], ["no2", "zero"], ["no2", "span"], ["no2", "algorithm"],
                 ["no2", "sheet", "import"], ["colocate", "no2"], ["colocate", "pm"], ["noise", "calibrate"],
                 ["calibration", "history"], ["calibration", "show"], ["pm", "humidity"], ["pm", "housing"]):
        r = cli(*args, "--help")
        assert r.exit_code == 0 and "Example" in r.output, args
