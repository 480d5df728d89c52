"""Bad run settings are refused at the Flower boundary, naming the key and the valid range."""

from __future__ import annotations

import pytest

from client.site_config import SiteConfig
from fedlens.errors import ConfigurationError
from fedlens.runconfig import RunConfig


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train-epsilon", 0.0, "run config train-epsilon: Input should be greater than 0"),
        ("explain-epsilon", -1.0, "run config explain-epsilon: Input should be greater than 0"),
        ("explain-delta", 0.5, "run config explain-delta: Input should be less than 0.01"),
        ("max-grad-norm", 0.0, "run config max-grad-norm: Input should be greater than 0"),
        ("attribution-clip", -0.5, "run config attribution-clip: Input should be greater than 0"),
        ("num-server-rounds", 0, "run config num-server-rounds: Input should be greater than"),
    ],
)
def test_bad_run_settings_name_the_key_and_range(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RunConfig.from_flower({**RunConfig().to_flower(), key: value})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("epsilon", 0.0, "node config epsilon: Input should be greater than 0"),
        ("delta", 0.0, "node config delta: Input should be greater than 0"),
        ("delta", 1.0, "node config delta: Input should be less than 0.01"),
    ],
)
def test_bad_site_settings_name_the_key_and_range(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SiteConfig.from_flower({"partition-id": 0, "num-partitions": 2, key: value})
