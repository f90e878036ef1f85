"""CRC-32C (Castagnoli), the spec's checksum (spec/format.md §8).

The ``crc32c`` package uses the CPU's CRC instruction (faster than a memcpy, and several times
zlib's CRC-32: ``python -m tools.bench.bench_checksum``, BENCHMARKS.md), so every blob can be
verified on every read. It is imported on the first call: its package import pulls in
``importlib.metadata`` and its CLI, which ``import adapterpack`` should not pay.
"""

from __future__ import annotations

from collections.abc import Callable

_impl: Callable[..., int] | None = None


def crc32c(data: bytes | memoryview, *, release: bool = False) -> int:
    """CRC-32C of ``data`` as an unsigned 32-bit int. ``release`` lets other threads run while it is computed,
    whatever the size (the package releases the GIL on its own only for large buffers)."""
    global _impl
    if _impl is None:
        from crc32c import crc32c as impl

        _impl = impl
    return _impl(data, gil_release_mode=1) if release else _impl(data)


# --- combining CRCs: the CRC-32C of A + B from those of A and B (zlib's crc32_combine, for the Castagnoli polynomial) ---

_POLY = 0x82F63B78  # the polynomial, bit-reversed: bit 31 is x^0


def _multmodp(a: int, b: int) -> int:
    """a(x)·b(x) modulo the polynomial, both in the reflected bit order (bit 31 is x^0)."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


#: x^(2^k) modulo the polynomial, k = 0..30. They repeat with period 31, not 32 as zlib's do: CRC-32C's polynomial is
#: (x+1) times a primitive polynomial of degree 31, so x^(2^31) = x modulo it (zlib's ``k & 31`` is wrong here from 2^29 bytes)
_X2N = [1 << 30]
for _ in range(30):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def _x8n(n: int) -> int:
    """x^(8n) modulo the polynomial: what appending n bytes does to a CRC register."""
    p, k = 1 << 31, 3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k], p)
        n >>= 1
        k = k + 1 if k < 30 else 0
    return p


#: n -> x^(8n) modulo the polynomial, for the lengths combined so far (one int each; at most _X8N_MAX of them)
_X8N: dict[int, int] = {}
_X8N_MAX = 1 << 16
#: n -> four 256-entry tables of c·x^(8n), one per byte of c: built for a length combined a second time, for at most
#: _SHIFTS_MAX lengths (those first seen twice; they are not evicted, so a file of more lengths does not rebuild them on
#: every load: building one costs about 30 plain multiplications)
_SHIFTS: dict[int, tuple[list[int], list[int], list[int], list[int]]] = {}
_SHIFTS_MAX = 256


def _shift_tables(b: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """The four tables of multiplication by ``b`` = x^(8n) (see _SHIFTS)."""
    basis = [0] * 32  # op·x^0 is the image of bit 31; each further power of x is one shift and reduce
    for j in range(31, -1, -1):
        basis[j] = b
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    made = []
    for k in range(4):
        t = [0] * 256
        for v in range(1, 256):
            low = v & -v
            t[v] = t[v ^ low] ^ basis[8 * k + low.bit_length() - 1]
        made.append(t)
    return made[0], made[1], made[2], made[3]


def crc32c_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32C of ``a + b`` from ``crc1`` = CRC-32C of ``a``, ``crc2`` = CRC-32C of ``b`` and ``length2`` = len(b)."""
    tables = _SHIFTS.get(length2)
    if tables is None:
        op = _X8N.get(length2)
        if op is None:  # first time: one multiplication
            op = _x8n(length2)
            if len(_X8N) < _X8N_MAX:
                _X8N[length2] = op
            return _multmodp(op, crc1) ^ crc2
        if len(_SHIFTS) >= _SHIFTS_MAX:
            return _multmodp(op, crc1) ^ crc2
        tables = _SHIFTS[length2] = _shift_tables(op)
    t0, t1, t2, t3 = tables
    return t0[crc1 & 255] ^ t1[(crc1 >> 8) & 255] ^ t2[(crc1 >> 16) & 255] ^ t3[crc1 >> 24] ^ crc2


#: n -> CRC-32C of n zero bytes (padding between blobs)
_ZEROS: dict[int, int] = {}


def crc32c_of_zeros(n: int) -> int:
    """CRC-32C of ``n`` zero bytes."""
    c = _ZEROS.get(n)
    if c is None:
        c = crc32c(bytes(n)) if n <= 1 << 20 else _zeros_long(n)
        if len(_ZEROS) < 256:
            _ZEROS[n] = c
    return c


def _zeros_long(n: int) -> int:
    """CRC-32C of ``n`` > 1 MiB zero bytes, from 1 MiB pieces."""
    mib = crc32c_of_zeros(1 << 20)
    c = 0
    while n >= 1 << 20:
        c = crc32c_combine(c, mib, 1 << 20)
        n -= 1 << 20
    return crc32c_combine(c, crc32c(bytes(n)), n) if n else c
