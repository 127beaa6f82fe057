"""LearningRateController schedules / warm-up, EpochCheckpoint early stopping and Throughput, driven by hand.

No ``fit``: the callbacks are called directly on a one-weight model, and every expected LR is
written out by hand from the schedule's definition.
"""
from __future__ import annotations

import math

import pytest
import tensorflow as tf

from trainer.config.settings import ScheduleSettings
from trainer.training.callbacks import EpochCheckpoint, LearningRateController, Throughput
from trainer.runtime.checkpoints import CheckpointStore
from trainer.training.state import TrainingState

STEPS = 10


def tiny_model() -> tf.keras.Model:
    model = tf.keras.Sequential([tf.keras.Input((1,)), tf.keras.layers.Dense(1)])
    model.compile(optimizer=tf.keras.optimizers.SGD(learning_rate=123.0), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def controller(schedule: ScheduleSettings, base_lr=0.1, scale=1, warmup=0.0, epochs=8, state=None,
               model=None):
    state = state or TrainingState()
    cb = LearningRateController(base_lr, scale, warmup, STEPS, epochs, schedule, state)
    cb.set_model(model or tiny_model())
    return cb, state


def lr(cb) -> float:
    return float(tf.keras.backend.get_value(cb.model.optimizer.learning_rate))


def epoch_lrs(cb, epochs) -> list[float]:
    values = []
    for epoch in epochs:
        cb.on_epoch_begin(epoch)
        values.append(lr(cb))
        logs = {}
        cb.on_epoch_end(epoch, logs)
        assert logs["lr"] == pytest.approx(values[-1])  # what history/TensorBoard record
    return values


def test_constant():
    cb, _ = controller(ScheduleSettings(name="constant"), base_lr=0.01)
    assert epoch_lrs(cb, range(5)) == pytest.approx([0.01] * 5)


def test_step_multiplies_by_gamma_every_step_epochs():
    cb, _ = controller(ScheduleSettings(name="step", step_epochs=2, gamma=0.5, min_lr=1e-6))
    assert epoch_lrs(cb, range(6)) == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_step_is_floored_at_min_lr():
    cb, _ = controller(ScheduleSettings(name="step", step_epochs=1, gamma=0.1, min_lr=1e-3))
    assert epoch_lrs(cb, range(4)) == pytest.approx([0.1, 0.01, 1e-3, 1e-3])


def test_cosine_decays_from_base_to_min_lr_at_the_end():
    epochs = 4
    cb, _ = controller(ScheduleSettings(name="cosine", min_lr=1e-3), epochs=epochs)
    by_hand = [0.1, 0.1 * 0.5 * (1 + math.cos(math.pi / 4)), 0.05, 0.1 * 0.5 * (1 + math.cos(3 * math.pi / 4))]
    assert epoch_lrs(cb, range(epochs)) == pytest.approx(by_hand)
    assert cb.lr_at(epochs) == pytest.approx(1e-3)  # the end of the schedule is min_lr, not 0
    assert cb.lr_at(epochs + 3) == pytest.approx(1e-3)  # and it stays there past the end


@pytest.mark.parametrize("name,shape", [("cosine", lambda t: 0.5 * (1 + math.cos(math.pi * t))),
                                        ("poly", lambda t: (1 - t) ** 0.9)])
def test_smooth_schedules_decay_step_by_step_within_an_epoch(name, shape):
    epochs = 4
    cb, _ = controller(ScheduleSettings(name=name, min_lr=0.0), epochs=epochs)
    cb.on_epoch_begin(1)
    seen = []
    for batch in range(STEPS):
        cb.on_train_batch_begin(batch)
        seen.append(lr(cb))
    assert seen == pytest.approx([0.1 * shape((1 + b / STEPS) / epochs) for b in range(STEPS)])
    assert all(a > b for a, b in zip(seen, seen[1:]))  # decays within the epoch, not per epoch


def test_plateau_drops_after_patience_epochs_without_improvement():
    schedule = ScheduleSettings(name="plateau", plateau_patience=2, gamma=0.5, min_lr=1e-6)
    cb, state = controller(schedule)
    checkpoint = EpochCheckpoint(None, state, patience=0)
    checkpoint.set_model(cb.model)
    seen = []
    for epoch, dice in enumerate([0.5, 0.4, 0.45, 0.6, 0.6, 0.6]):
        cb.on_epoch_begin(epoch)
        seen.append(lr(cb))
        logs = {"val_dice": dice}
        cb.on_epoch_end(epoch, logs)  # run order: LR controller, then checkpoint (best Dice update)
        checkpoint.on_epoch_end(epoch, logs)
    # epochs 1, 2 do not beat 0.5 -> drop before epoch 3; 3 improves; 4, 5 do not -> drop after 5
    assert seen == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05])
    assert float(state.lr_factor.numpy()) == pytest.approx(0.25)
    assert int(state.plateau_wait.numpy()) == 0


def test_plateau_counter_and_factor_survive_a_checkpoint_restore(tmp_path):
    schedule = ScheduleSettings(name="plateau", plateau_patience=2, gamma=0.5, min_lr=1e-6)
    model = tiny_model()
    state = TrainingState()
    cb, _ = controller(schedule, state=state, model=model)
    checkpoint = EpochCheckpoint(CheckpointStore(tmp_path, model, model.optimizer, state, keep=3), state, 0)
    checkpoint.set_model(model)
    for epoch, dice in enumerate([0.5, 0.4]):  # one epoch without improvement: wait = 1
        cb.on_epoch_begin(epoch)
        logs = {"val_dice": dice}
        cb.on_epoch_end(epoch, logs)
        checkpoint.on_epoch_end(epoch, logs)
    assert int(state.plateau_wait.numpy()) == 1
    assert any(v is state.plateau_wait for v in state.all_variables())  # synced across workers

    resumed = TrainingState()
    store = CheckpointStore(tmp_path, model, model.optimizer, resumed, keep=3)
    assert store.restore_latest() is not None
    assert int(resumed.plateau_wait.numpy()) == 1 and int(resumed.epoch.numpy()) == 2
    assert float(resumed.best_dice.numpy()) == pytest.approx(0.5)
    cb2, _ = controller(schedule, state=resumed, model=model)
    cb2.on_epoch_begin(2)
    cb2.on_epoch_end(2, {"val_dice": 0.3})  # the second non-improving epoch -> drop now
    assert float(resumed.lr_factor.numpy()) == pytest.approx(0.5)
    cb2.on_epoch_begin(3)
    assert lr(cb2) == pytest.approx(0.05)
    # ... and the lowered factor itself is restored too
    store.save(3, False)
    again = TrainingState()
    assert CheckpointStore(tmp_path, model, model.optimizer, again, keep=3).restore_latest().endswith("epoch-3")
    cb3, _ = controller(schedule, state=again, model=model)
    cb3.on_epoch_begin(3)
    assert lr(cb3) == pytest.approx(0.05)


def test_linear_warmup_ramps_from_single_worker_lr_to_scaled_lr():
    cb, _ = controller(ScheduleSettings(name="constant"), base_lr=0.01, scale=4, warmup=2.0)
    single, scaled = 0.01, 0.04

    def ramp(epoch, batch):  # Goyal et al.: linear from LR to N x LR over the warm-up
        progress = (epoch + batch / STEPS) / 2.0
        return single + (scaled - single) * progress

    for epoch in range(3):
        cb.on_epoch_begin(epoch)
        assert lr(cb) == pytest.approx(ramp(epoch, 0) if epoch < 2 else scaled)
        for batch in (0, 5, 9):
            cb.on_train_batch_begin(batch)
            assert lr(cb) == pytest.approx(ramp(epoch, batch) if epoch < 2 else scaled), (epoch, batch)


def test_no_warmup_without_scaling():
    cb, _ = controller(ScheduleSettings(name="constant"), base_lr=0.01, scale=1, warmup=2.0)
    cb.on_epoch_begin(0)
    cb.on_train_batch_begin(3)
    assert lr(cb) == pytest.approx(0.01)


def test_warmup_then_step_schedule_uses_the_scaled_lr():
    cb, _ = controller(ScheduleSettings(name="step", step_epochs=2, gamma=0.5, min_lr=1e-6), base_lr=0.01,
                       scale=2, warmup=1.0)
    assert epoch_lrs(cb, range(4)) == pytest.approx([0.01, 0.02, 0.01, 0.01])


def run_early_stopping(scores, patience):
    state = TrainingState()
    cb = EpochCheckpoint(None, state, patience)
    cb.set_model(tiny_model())
    cb.model.stop_training = False
    for epoch, score in enumerate(scores):
        logs = {} if score is None else {"val_dice": score}
        cb.on_epoch_end(epoch, logs)
        assert logs["best_val_dice"] == pytest.approx(float(state.best_dice.numpy()))
        if cb.model.stop_training:
            return epoch + 1, state
    return None, state


def test_early_stopping_after_patience_epochs_without_gain():
    stopped, state = run_early_stopping([0.3, 0.5, 0.5, 0.4, 0.6], patience=2)
    assert stopped == 4  # epochs 3 and 4 did not beat 0.5 (equal is no gain)
    assert float(state.best_dice.numpy()) == pytest.approx(0.5) and int(state.best_epoch.numpy()) == 2
    assert int(state.epoch.numpy()) == 4


def test_early_stopping_counter_resets_on_improvement_and_is_off_at_zero():
    assert run_early_stopping([0.3, 0.2, 0.4, 0.3, 0.5, 0.1], patience=2)[0] is None
    assert run_early_stopping([0.5, 0.1, 0.1, 0.1, 0.1], patience=0)[0] is None
    assert run_early_stopping([0.5, None, None], patience=2)[0] == 3  # no val Dice = no gain


def test_best_checkpoint_follows_case_level_dice_where_per_slice_dice_disagrees():
    """Two epochs' validation of one case of 10 slices (counts per slice: tp, fp, fn, tn).
    Epoch A predicts nothing: the 8 tumour-free slices score 1 each, the 2 tumour slices 0, so the
    per-slice mean is 0.8 but the case-level Dice is 0. Epoch B finds the tumour and adds small
    false positives on the empty slices: per-slice mean 0.2, case-level Dice 200/240. Checkpoint
    selection must pick B."""
    import numpy as np

    from trainer.models.metrics import count_ratios
    from trainer.training.validation import case_level_logs

    empty_ok, tumour_missed = [0, 0, 0, 100], [0, 0, 50, 50]
    empty_fp, tumour_found = [0, 5, 0, 95], [50, 0, 0, 50]
    epochs = {"A": np.array([empty_ok] * 8 + [tumour_missed] * 2, float),
              "B": np.array([empty_fp] * 8 + [tumour_found] * 2, float)}
    logs = {}
    for name, per_slice in epochs.items():
        slice_dice = float(count_ratios(per_slice[:, None, :])["dice"].mean())
        logs[name] = {**case_level_logs(per_slice.sum(axis=0)[None, None, :], ("wt",)), "val_slice_dice": slice_dice}
    assert logs["A"]["val_slice_dice"] > logs["B"]["val_slice_dice"]  # per-slice ranking: A
    assert logs["B"]["val_dice"] > logs["A"]["val_dice"]  # case-level ranking: B
    assert logs["A"]["val_dice"] == pytest.approx(0.0) and logs["B"]["val_dice"] == pytest.approx(200 / 240)

    state = TrainingState()
    checkpoint = EpochCheckpoint(None, state, patience=0)
    checkpoint.set_model(tiny_model())
    for epoch, name in enumerate(("A", "B")):
        checkpoint.on_epoch_end(epoch, dict(logs[name]))
    assert int(state.best_epoch.numpy()) == 2 and float(state.best_dice.numpy()) == pytest.approx(200 / 240)


def test_throughput_counts_wall_clock_from_the_epoch_start_and_reports_the_input_startup_apart():
    now = [0.0]
    cb = Throughput(global_batch=2, clock=lambda: now[0])
    cb.on_epoch_begin(0)
    now[0] = 5.0  # iterator created and first batch fetched
    for step in range(4):
        cb.on_train_batch_begin(step)
        now[0] += 1.0
        cb.on_train_batch_end(step)
    now[0] += 3.0  # validation: not training time
    logs: dict = {}
    cb.on_epoch_end(0, logs)
    assert logs == {"images_per_sec": 8 / 9.0, "startup_seconds": 5.0, "epoch_seconds": 12.0}
    cb.on_epoch_begin(1)  # the next epoch starts from zero again
    cb.on_epoch_end(1, logs)
    assert logs["startup_seconds"] == 0.0 and logs["images_per_sec"] == 0.0


def test_history_csv_keeps_values_under_their_headers_when_a_resumed_run_logs_a_new_column(tmp_path):
    """A run resumed by a version that logs one more figure: the CSV gains the column, older rows
    get an empty cell, and no value lands under another column's header (appending under the first
    header did that). A re-run epoch replaces its row."""
    import csv
    import json
    from types import SimpleNamespace

    from trainer.training.callbacks import JsonHistory

    old = [{"epoch": 1, "step": 10, "loss": 0.9, "val_dice": 0.5}, {"epoch": 2, "step": 20, "loss": 0.7, "val_dice": 0.6}]
    (tmp_path / "history.json").write_text(json.dumps({"epochs": old}))
    (tmp_path / "history.csv").write_text("epoch,loss,val_dice\n0,0.9,0.5\n1,0.7,0.6\n")
    history = JsonHistory(tmp_path / "history.json", csv_path=tmp_path / "history.csv")
    iterations = tf.Variable(30, dtype=tf.int64)
    history.set_model(SimpleNamespace(optimizer=SimpleNamespace(iterations=iterations)))
    history.on_epoch_end(2, {"loss": 0.5, "startup_seconds": 0.25, "val_dice": 0.7})
    with open(tmp_path / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["epoch", "step", "loss", "startup_seconds", "val_dice"]
    assert [(r["epoch"], r["loss"], r["startup_seconds"], r["val_dice"]) for r in rows] == [
        ("1", "0.9", "", "0.5"), ("2", "0.7", "", "0.6"), ("3", "0.5", "0.25", "0.7")]
    iterations.assign(25)
    history.on_epoch_end(1, {"loss": 0.65, "startup_seconds": 0.2, "val_dice": 0.62})  # epoch 2 again
    with open(tmp_path / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["epoch"], r["step"], r["loss"]) for r in rows] == [("1", "10", "0.9"), ("2", "25", "0.65")]
    assert json.loads((tmp_path / "history.json").read_text())["epochs"][-1]["startup_seconds"] == 0.2
