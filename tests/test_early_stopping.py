"""Early stopping against hand-traced sequences of validation values."""

from medjax.early_stopping import EarlyStopping


def test_loss_is_minimised_and_patience_counts_evaluations_without_improvement():
    stopper = EarlyStopping(monitor="loss", patience=2, min_delta=0.01)
    # 1.0 best; 0.995 is not better by more than 0.01 (bad 1); 0.9 best (bad 0); 0.95, 0.91 bad 1, 2 -> stop.
    assert [stopper.update(v) for v in (1.0, 0.995, 0.9, 0.95, 0.91)] == [False, False, False, False, True]
    assert stopper.state() == {"best": 0.9, "bad_evals": 2}


def test_other_metrics_are_maximised_and_state_resumes():
    stopper = EarlyStopping(monitor="auc", patience=2, min_delta=0.0)
    assert [stopper.update(v) for v in (0.8, 0.85, 0.85)] == [False, False, False]
    resumed = EarlyStopping(monitor="auc", patience=2, min_delta=0.0, state=stopper.state())
    assert resumed.update(0.84) is True  # Second evaluation without improvement, counted across the resume.


def test_patience_zero_never_stops():
    stopper = EarlyStopping(monitor="loss", patience=0, min_delta=0.0)
    assert not any(stopper.update(v) for v in (1.0, 2.0, 3.0, 4.0))
