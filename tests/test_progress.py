"""One progress bar per phase (SFT, then RL), each over its own number of batches with its own ETA; bars for the
evaluations and the probe pass; no "Epoch 0" bar over the whole run."""

from conftest import run_tiny


def test_a_bar_per_phase_and_bars_for_evaluation(tmp_path, capsys, one_thread):
    run_tiny(tmp_path, "--trainer.enable_progress_bar=true", "--trainer.logger=false", "--data.n_test=8")
    out = capsys.readouterr()
    text = (out.out + out.err).replace("\r", "\n")
    assert "SFT: 100%" in text and "6/6" in text  # model.sft.steps = 6
    assert "RL: 100%" in text and "3/3" in text  # model.rl.steps = 3
    assert "Epoch 0" not in text
    assert "eval start: test" in text and "inversion probe" in text
    assert "Total FLOPs" not in text and "litlogger" not in text
