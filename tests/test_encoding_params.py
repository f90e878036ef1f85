"""Every encoding's validate() refuses params of the wrong type with an adapterpack error.

In-memory records can hold any Python or numpy value (the Hypothesis writer property found a
numpy array as ``layout`` raising numpy's "truth value is ambiguous" ValueError); a reader or
writer must answer with a RecordError naming the param instead.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from adapterpack.container.reader import ApackReader
from adapterpack.errors import AdapterpackError

VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors"
ODD_VALUES = [np.array([0.0, 0.0]), np.array(["linear"]), [1, 2], {"a": 1}, None, float("nan"), True, "x"]


def _records() -> list:
    seen, out = set(), []
    for path in sorted(VECTORS.glob("*.apack")):
        try:
            reader = ApackReader(path)
            for name in reader.adapter_names:
                for m in reader.adapter(name):
                    key = (m.encoding, tuple(sorted(m.params)))
                    if key not in seen:
                        seen.add(key)
                        out.append(m)
        except AdapterpackError:
            continue  # the vectors that must be refused
    return out


RECORDS = _records()


def test_every_encoding_is_covered() -> None:
    from adapterpack.encodings import encoding_ids

    assert {m.encoding for m in RECORDS} == set(encoding_ids())


@pytest.mark.parametrize("module", RECORDS, ids=lambda m: f"{m.encoding}:{m.name}")
def test_odd_param_values_are_refused_cleanly(module) -> None:
    impl = module.implementation
    impl.validate(module)
    for key in module.params:
        for value in ODD_VALUES:
            odd = replace(module, params={**module.params, key: value})
            try:
                impl.validate(odd)
            except AdapterpackError:
                pass  # refused, with our error
