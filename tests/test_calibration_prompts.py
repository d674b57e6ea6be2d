"""Quantized artifacts are judged on a stream they were not calibrated on."""

from s2dit_deploy.fidelity import DEFAULT_PROMPT
from s2dit_deploy.quant.capture import CALIB_PROMPTS, EVAL_PROMPTS
from s2dit_deploy.targets.qnn.calibration import DEFAULTS
from s2dit_deploy.targets.xnnpack.target import CALIBRATION_PROMPTS


def test_calibration_and_validation_prompts_are_disjoint():
    assert DEFAULT_PROMPT in EVAL_PROMPTS
    for calib in (CALIB_PROMPTS, CALIBRATION_PROMPTS, (DEFAULTS["prompt"],)):
        assert DEFAULT_PROMPT not in calib
        assert not set(calib) & set(EVAL_PROMPTS)
