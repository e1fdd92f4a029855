"""The tracker's ``anatomy: true``: emergence.csv's columns, per-token tables, validate's table, figure, report."""

import json

import numpy as np
import pytest
from conftest import REPO
from scipy.stats import spearmanr

from corrpo.cli import build_cli
from corrpo.inversion.anatomy import anatomy_factor_names
from corrpo.inversion.anatomy_probe import factor_table
from corrpo.models.architectures import decoder_parts
from corrpo.models.loading import load_policy
from corrpo.runs import report
from corrpo.runs.plotting import anatomy_figure
from corrpo.runs.run_folder import ANATOMY_PREFIX, EMERGENCE_COLUMNS, RunFolder

pytestmark = pytest.mark.usefixtures("one_thread")


def qwen2_factors() -> tuple[str, ...]:
    model, _ = load_policy("tiny-qwen2")
    return anatomy_factor_names(decoder_parts(model))


def test_emergence_csv_carries_one_rho_column_per_factor_at_every_probe(tiny_run):
    frame = RunFolder(tiny_run).read_emergence()
    factors = qwen2_factors()
    assert list(frame.columns) == EMERGENCE_COLUMNS + [ANATOMY_PREFIX + f for f in factors]
    # Qwen2's logit map is the identity: its slope is 1 at every token, and a constant's rho is undefined (NaN)
    assert frame[ANATOMY_PREFIX + "logit_slope"].isna().all()
    anatomy = frame[[ANATOMY_PREFIX + f for f in factors if f != "logit_slope"]]
    assert anatomy.notna().all().all() and ((anatomy >= -1) & (anatomy <= 1)).all().all()


@pytest.mark.parametrize("event", ["boundary", "end"])
def test_the_per_token_table_holds_the_factors_the_csv_correlates(tiny_run, event):
    run = RunFolder(tiny_run)
    table = run.read_anatomy_tokens(event)
    factors = qwen2_factors()
    assert list(table.columns) == ["token", "entropy_bits", "strength", "position", *factors]
    # the columns are the right factors: the final-norm ones multiply to |dz/dh| token by token ...
    product = table["inv_rms"] * table["w_norm"] * table["sin"] * table["logit_slope"]
    assert ((product - table["dz_dh"]).abs() <= 1e-5 * table["dz_dh"].abs().max()).all()
    # ... and the table's Spearman(H, factor) is the row's (every probe token is in the table here)
    row = run.read_emergence().query("event == @event").iloc[-1]
    assert len(table) == row["n_tokens"]
    assert (table["logit_slope"] == 1).all()
    for name in (f for f in factors if f != "logit_slope"):
        ok = table[name].notna()
        rho = spearmanr(table["entropy_bits"][ok], table[name][ok]).statistic
        assert rho == pytest.approx(row[ANATOMY_PREFIX + name], abs=1e-6), name


def test_validate_prints_the_factor_table_with_the_fingerprint(tiny_run, tmp_path, capsys):
    build_cli(["validate", "--config", str(REPO / "configs" / "fingerprint.yaml"), "--model.policy",
               str(tiny_run / "policy"), f"--trainer.default_root_dir={tmp_path}", "--data.n_probe=4",
               "--data.n_test=8", "--trainer.callbacks.anatomy=true"])  # fmt: skip
    out = capsys.readouterr().out
    (saved,) = tmp_path.rglob("fingerprint.json")
    row = json.loads(saved.read_text())
    rho = {f: row[ANATOMY_PREFIX + f] for f in qwen2_factors()}
    assert factor_table(rho, row["spearman"]) in out
    assert out.count("\n") > len(rho)  # one line per factor


def test_the_anatomy_figure_draws_every_varying_factor_column_of_a_real_run(tiny_run):
    frame = RunFolder(tiny_run).read_emergence()
    figure = anatomy_figure(frame.to_dict("records"), boundary_batches=6)
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert np.allclose(lines["strength S"].get_ydata(), frame["spearman"])
    for name in qwen2_factors():
        if name == "logit_slope":  # constant on a Qwen2 probe set: no curve
            assert name not in lines
            continue
        assert np.allclose(lines[name].get_xdata(), frame["batches"])
        assert np.allclose(lines[name].get_ydata(), frame[ANATOMY_PREFIX + name]), name


def test_the_report_of_an_anatomy_run_has_its_figure_and_factor_table(tiny_run):
    md = report.write_report(tiny_run)[-1]  # summary.md, written last
    assert RunFolder(tiny_run).anatomy_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    end = RunFolder(tiny_run).read_emergence().query("event == 'end'").iloc[-1]
    row = next(line for line in text.splitlines() if line.startswith("| end |") and line.count("|") > 12)
    assert f"{end[ANATOMY_PREFIX + 'sin']:.4f}" in row and "![anatomy](anatomy.png)" in text
