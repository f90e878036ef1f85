"""A vLLM ``LoRAResolver`` plugin: serve ``<name>.apack`` files from a folder by adapter name.

vLLM asks registered resolvers for adapters it does not know yet
(``await resolver.resolve_lora(base_model_name, lora_name) -> LoRARequest | None``; plugins
register through the ``vllm.general_plugins`` entry point, which vLLM calls at start-up; runtime
LoRA loading needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``). This one:

1. looks for ``<lora_name>.apack`` in ``$ADAPTERPACK_VLLM_DIR`` (names with path separators or a
   leading dot are not looked up);
2. checks that the adapter's recorded base model is the model being served (else: not ours, None);
3. decodes it once into a PEFT folder vLLM reads correctly (:func:`~adapterpack.formats.serving.write_vllm`:
   ranks kept, per-module scales baked into B) under ``$ADAPTERPACK_VLLM_CACHE``
   (default ``~/.cache/adapterpack/vllm``), in a folder named by the file's SHA-256 and the rank
   limit it was written for, written atomically; later requests (and other vLLM processes with the
   same ``max_lora_rank``) reuse it, and a changed file or another limit gets a new folder;
4. returns ``LoRARequest(lora_name, lora_int_id, lora_path)``.

vLLM is imported only when a request object is built or the plugin registers, so the
decode-and-cache path works (and is tested) without vLLM installed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterpack.errors import AdapterpackError
from adapterpack.text import printable

ENV_DIR = "ADAPTERPACK_VLLM_DIR"
ENV_CACHE = "ADAPTERPACK_VLLM_CACHE"
ENV_MAX_RANK = "ADAPTERPACK_VLLM_MAX_LORA_RANK"
RESOLVER_NAME = "adapterpack"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
log = logging.getLogger(__name__)


def default_cache() -> Path:
    """``$ADAPTERPACK_VLLM_CACHE`` or ``~/.cache/adapterpack/vllm``."""
    env = os.environ.get(ENV_CACHE)
    return Path(env) if env else Path.home() / ".cache" / "adapterpack" / "vllm"


def file_sha256(path: Path) -> str:
    """SHA-256 of the file's bytes (hex), read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def lora_request(lora_name: str, lora_int_id: int, lora_path: str) -> Any:
    """vLLM's ``LoRARequest`` (imported here, on first use)."""
    from vllm.lora.request import LoRARequest  # vllm: optional; the decode-and-cache path runs without it

    return LoRARequest(lora_name=lora_name, lora_int_id=lora_int_id, lora_path=lora_path)


class ApackResolver:
    """Finds ``<name>.apack`` in ``folder``, checks the base model, decodes once to a cached PEFT folder.

    ``make_request(lora_name, lora_int_id, lora_path)`` builds what :meth:`resolve_lora` returns
    (vLLM's ``LoRARequest`` by default; tests pass a stand-in).
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        max_lora_rank: int | None = None,
        make_request: Callable[[str, int, str], Any] = lora_request,
    ) -> None:
        self.folder = Path(folder)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache()
        self.max_lora_rank = max_lora_rank
        self.make_request = make_request
        self._hashes: dict[tuple[int, int, int, int], str] = {}
        self._lock = threading.Lock()

    def find(self, lora_name: str) -> Path | None:
        """``folder/<lora_name>.apack`` if the name is a plain file name and the file exists."""
        if not _NAME.fullmatch(lora_name) or lora_name.endswith(".apack"):
            return None
        path = self.folder / f"{lora_name}.apack"
        return path if path.is_file() else None

    def _hash(self, path: Path) -> str:
        st = path.stat()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        digest = self._hashes.get(key)
        if digest is None:
            digest = file_sha256(path)
            self._hashes[key] = digest
        return digest

    def materialize(self, base_model_name: str, lora_name: str) -> Path | None:
        """The cached PEFT folder for ``lora_name`` (decoding it on first use), or None when this
        resolver has no such adapter for ``base_model_name``."""
        from adapterpack.formats import read_any  # plugin: vLLM imports this module in every process at start-up
        from adapterpack.formats.serving import write_vllm  # plugin start-up, as above

        path = self.find(lora_name)
        if path is None:
            return None
        with self._lock:
            digest = self._hash(path)
            dest = self.cache_dir / self.folder_name(lora_name, digest)
            with read_any(path) as ad:
                if ad.base_model != base_model_name:
                    log.info("adapterpack: %s is for base model %r, not %r", printable(str(path)), ad.base_model, base_model_name)
                    return None
                if (dest / "adapter_config.json").is_file() and (dest / "adapter_model.safetensors").is_file():
                    return dest
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                write_vllm(ad, dest, max_lora_rank=self.max_lora_rank)
            return dest

    def folder_name(self, lora_name: str, digest: str) -> str:
        """The cache folder's name: adapter name, the rank limit (write_vllm's output depends on it: an adapter
        above the limit is re-ranked down) and the file's hash, last (:meth:`lora_int_id` reads it)."""
        limit = "default" if self.max_lora_rank is None else str(int(self.max_lora_rank))
        return f"{lora_name}-r{limit}-{digest[:32]}"

    def lora_int_id(self, lora_name: str, path: Path) -> int:
        """A positive id vLLM can use, stable for one file content: 60 bits of its hash (vLLM keys loaded
        adapters by this id, so two contents must not share one; vLLM's own resolver uses 63-bit ids)."""
        return 1 + int(path.name.rsplit("-", 1)[-1][:15], 16)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
        """vLLM's resolver hook: a request for the cached folder, or None (not found, other base model, unreadable
        or refused file, cache folder not writable: each logged as a warning)."""
        try:
            dest = await asyncio.to_thread(self.materialize, base_model_name, lora_name)
        except (AdapterpackError, OSError) as e:
            log.warning("adapterpack: cannot serve %r: %s", lora_name, printable(str(e)))
            return None
        if dest is None:
            return None
        return self.make_request(lora_name, self.lora_int_id(lora_name, dest), str(dest))


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register an :class:`ApackResolver` when ``$ADAPTERPACK_VLLM_DIR`` is set."""
    folder = os.environ.get(ENV_DIR)
    if not folder:
        return
    if not Path(folder).is_dir():
        raise ValueError(f"{ENV_DIR}={folder!r} is not a folder")
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry  # vllm: optional, as above

    cls = type("ApackLoRAResolver", (ApackResolver, LoRAResolver), {})
    rank = os.environ.get(ENV_MAX_RANK)
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, cls(folder, max_lora_rank=int(rank) if rank else None))
