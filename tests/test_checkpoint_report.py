"""The explain report's training section reads metrics.jsonl's last eval row."""

import json

from cbm_lm.eval.checkpoint_report import training_section


def test_report_shows_eval_loss_with_and_without_epsilon(tmp_path):
    rows = [{"step": 10, "loss": 3.0, "eval_lm_loss": 2.9, "eval_lm_loss_no_epsilon": 4.1},
            {"step": 15, "loss": 2.5},
            {"step": 20, "loss": 2.0, "eval_lm_loss": 1.875, "eval_lm_loss_no_epsilon": 2.625},
            {"step": 25, "loss": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = "\n".join(training_section(str(tmp_path)))
    assert "- steps: 25" in text
    assert "held-out lm_loss (step 20): 1.8750 nats/token" in text
    assert "held-out lm_loss without epsilon (concept path only): 2.6250 nats/token" in text
    assert "4.1000" not in text      # an earlier eval row is not the one reported
