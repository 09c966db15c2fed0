"""Worker(worker_id=...) refuses what is not a usable id, also when it is falsy.

`_checked_worker_id` refuses a non-string or an invalid id with ConfigError, but the
constructor only calls it `if worker_id`: 0, False or "" (an unset environment variable
read with a default of "") were accepted silently and replaced by a random id, so the
worker registered under a name its operator never chose.

Found by a review: the constructor now checks any worker_id that is not None.
"""

from __future__ import annotations

import pytest

from conveyor import Worker
from conveyor.errors import ConfigError


@pytest.mark.parametrize("worker_id", [0, False, ""], ids=["zero", "false", "empty"])
def test_a_falsy_worker_id_is_refused(worker_id: object) -> None:
    with pytest.raises(ConfigError):
        Worker("127.0.0.1:1", worker_id=worker_id)  # type: ignore[arg-type]
