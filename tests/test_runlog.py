import json
import os

import pytest

from sarvit.runlog import RunLog, read_metrics


def rows(*epochs):
    return [{"epoch": e, "step": 6 * e, "train_loss": 1.0 / e} for e in epochs]


def test_resume_drops_the_records_of_epochs_that_will_be_trained_again(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(1, 2, 3)) + '{"epoch": 4, "tra')  # torn by a kill
    log = RunLog(tmp_path, main=True, resume_epoch=2, resume_step=12)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows(1, 2)
    log.epoch(rows(3)[0] | {"train_loss": 0.25}, 18)
    log.close()
    assert read_metrics(path) == rows(1, 2) + [rows(3)[0] | {"train_loss": 0.25}]
    assert sorted(p for p in os.listdir(tmp_path) if p != "tensorboard") == ["metrics.jsonl"]


def test_a_fresh_run_starts_an_empty_log_and_other_ranks_write_nothing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows(1)[0]) + "\n")
    RunLog(tmp_path, main=False, resume_epoch=0).epoch(rows(1)[0], 6)
    assert read_metrics(tmp_path / "metrics.jsonl") == rows(1)
    RunLog(tmp_path, main=True, resume_epoch=0).close()
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_an_epoch_without_a_training_step_is_not_recorded(tmp_path):
    log = RunLog(tmp_path, main=True)
    with pytest.raises(ValueError, match="epoch 3 trained no step"):
        log.epoch({"epoch": 3, "step": 18, "lr": 1e-3}, 18)
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == []
