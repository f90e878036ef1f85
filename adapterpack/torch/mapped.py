"""``.apack`` → :class:`LoraTensors`: validate the index, stage the blobs, run each record's torch decoder.

The index is validated by :class:`~adapterpack.container.ApackReader` exactly as for numpy.
Records whose decoder is registered ``staged`` (``lora``) get their slots as device tensors read
by :func:`adapterpack.torch.staging.stage` (zero-copy views or a few large copies); other records
go to their decoder as opened (or to the numpy fallback), which reads its own tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from adapterpack.adapter import Module
from adapterpack.container.reader import ApackReader
from adapterpack.torch.decoders import decode_all, is_staged
from adapterpack.torch.staging import check_same_file, stage
from adapterpack.torch.tensors import LoraTensors, lora_tensors


def load_apack(
    path: str | os.PathLike[str],
    device: torch.device,
    dtype: torch.dtype | None,
    adapter: str | None,
    verify: bool,
    *,
    zero_copy: bool = True,
    bounce: bool | None = None,
) -> dict[str, LoraTensors]:
    """Every module of one adapter in an ``.apack`` file as :class:`LoraTensors` on ``device``."""
    path = Path(path)
    with open(path, "rb") as f, ApackReader(path, verify=verify) as reader:
        check_same_file(path, f.fileno(), reader)
        ad = reader.adapter(adapter)  # validates every record, as for numpy
        raw = reader.index.adapters[reader.adapter_names.index(ad.name)]["modules"]
        refs = {m["name"]: m["tensors"] for m in raw}
        staged_names = [name for name, m in ad.modules.items() if is_staged(m.encoding)]
        wanted = [i for name in staged_names for i in refs[name].values()]
        tensors = stage(reader, f.fileno(), wanted, device, verify=verify, zero_copy=zero_copy, bounce=bounce)
        mods = [
            Module(m.name, m.encoding, m.base_shape, m.params, {s: tensors[i] for s, i in refs[name].items()})
            if name in refs and is_staged(m.encoding)
            else m
            for name, m in ad.modules.items()
        ]
        return {name: lora_tensors(f) for name, f in decode_all(mods, device, dtype).items()}
