"""How a failed trial's error is classified: bad input (exit 2) or not (exit 1), through Ray's wrappers."""
import pytest
from ray.exceptions import RayTaskError
from ray.tune.error import TuneError

from sweeps.failures import bad_input_reason, cause_of, is_bad_input
from trainable.errors import ConfigError, DataError, DeviceUnavailable, TrialDiverged


def as_tune_reports_it(error: BaseException) -> BaseException:
    """What a trial's exception becomes in the driver: a RayTaskError that is also an instance of the cause."""
    return RayTaskError(function_name="train", traceback_str="Traceback ...", cause=error).as_instanceof_cause()


@pytest.mark.parametrize("error, bad_input", [
    (DataError("a.png: corrupt or truncated PNG (image file is truncated)"), True),
    (ConfigError("optimizer='sgd' with lr=1, weight_decay=0, momentum=0: ..."), True),
    (TrialDiverged("training loss became nan at epoch 1, step 0"), False),       # a result of the config
    (DeviceUnavailable("node n1 (10.0.0.1): ... sees no usable CUDA device"), False),
    (RuntimeError("CUDA out of memory"), False),
])
def test_bad_input_is_told_apart_through_rays_wrapper(error, bad_input):
    wrapped = as_tune_reports_it(error)
    assert is_bad_input(wrapped) is bad_input
    assert str(cause_of(wrapped)) == str(error)             # the one-line reason, not the traceback
    assert is_bad_input(None) is False


@pytest.mark.parametrize("error, bad_input", [
    (DataError("a.png: corrupt or truncated PNG (image file is truncated)"), True),
    (ConfigError("config: lr=0 must be > 0"), True),
    (TrialDiverged("training loss became nan at epoch 1, step 0"), False),
    (RuntimeError("trainable.errors.DataError: in a message, not the raised class"), False),
])
def test_bad_input_is_told_apart_in_the_error_text_tune_reads_back(error, bad_input):
    """Tune's result grid holds TuneError(text of error.txt) where the error.pkl is not unpickled."""
    text = ("Traceback (most recent call last):\n  File \"trainable/train.py\", line 1, in train\n"
            f"{type(error).__module__}.{type(error).__qualname__}: {error}\n")
    assert is_bad_input(TuneError(text)) is bad_input
    assert bad_input_reason(TuneError(text)) == (str(error) if bad_input else None)
