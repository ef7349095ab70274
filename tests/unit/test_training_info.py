"""External data references hidden in ``ModelProto.training_info`` are refused (issue 21
item 11): onnxruntime's inference session ignores training_info today, but blindinfer
serves self-contained models only, wherever a reference hides."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from blindinfer.runtime.errors import InvalidModelError
from blindinfer.runtime.external_data import refuse_external_data
from blindinfer.runtime.session import ModelSession
from support.training_info_models import model_with_training_info


@pytest.mark.parametrize("where", ["initialization", "algorithm", "algorithm-node"])
def test_external_data_in_training_info_is_refused(where: str) -> None:
    data = model_with_training_info(external_in=where)
    assert len(onnx.load_from_string(data).training_info) == 1
    with pytest.raises(InvalidModelError, match="external data"):
        refuse_external_data(data)
    with pytest.raises(InvalidModelError, match="external data"):
        ModelSession(data)


def test_training_info_without_external_data_still_loads() -> None:
    session = ModelSession(model_with_training_info(external_in=None))
    x = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(session.run({"x": x})["y"], x)
