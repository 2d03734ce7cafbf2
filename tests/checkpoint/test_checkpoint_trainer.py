"""`jaxpp train --checkpoint-dir DIR --save-every N --resume`: a lost run resumes exactly."""

import io
import shutil

import pytest

from jaxpp import _trainer, checkpoint
from jaxpp.cli import main

TINY = {
    "num_stages": 2,
    "num_layers": 2,
    "d_model": 16,
    "num_heads": 2,
    "vocab_size": 16,
    "seq_len": 8,
    "batch_size": 4,
    "num_microbatches": 2,
    "steps": 4,
    "warmup_steps": 1,
    "log_every": 100,
}
CLI = (
    "train --stages 2 --layers 2 --heads 2 --vocab 16 --seq-len 8 --batch-size 4 "
    "--microbatches 2 --warmup 1 --log-every 100"
).split()


def test_trainer_resume_after_losing_last_checkpoint_repeats_losses_exactly(tmp_path, capsys):
    config = _trainer.TrainConfig(checkpoint_dir=str(tmp_path), save_every=2, **TINY)
    full = _trainer.train(config, out=io.StringIO())
    with checkpoint.CheckpointManager(tmp_path) as manager:
        assert manager.all_steps() == (2, 4)
    shutil.rmtree(tmp_path / "4")  # as if the run had died after step 2's save
    out = io.StringIO()
    resumed = _trainer.train(
        _trainer.TrainConfig(checkpoint_dir=str(tmp_path), save_every=2, resume=True, **TINY),
        out=out,
    )
    assert "resumed from step 2" in out.getvalue()
    assert resumed.losses == full.losses[2:]  # bit for bit
    # The CLI refuses resumes that cannot work, naming the fix.
    common = [*CLI, "--checkpoint-dir", str(tmp_path), "--resume"]
    assert main([*common, "--d-model", "16", "--steps", "3"]) == 2
    assert "nothing to train. Fix: raise --steps" in capsys.readouterr().out
    assert main([*common, "--d-model", "32", "--steps", "6"]) == 2
    assert "another config: d_model: saved 16, now 32" in capsys.readouterr().out


def test_trainer_config_resume_without_directory_raises():
    with pytest.raises(ValueError, match="resume=True needs a checkpoint directory"):
        _trainer.TrainConfig(resume=True)
    with pytest.raises(ValueError, match="save_every=-1 must be >= 0"):
        _trainer.TrainConfig(save_every=-1)
