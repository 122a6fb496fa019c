"""Codec speed: encode/decode of a Params chunk of 1-100 MB vs numpy memcpy and pickle.

"fresh copy" is one copy of the array into a new `bytes` (`tobytes()`): the floor for any
encoder that returns new bytes.  It is well below memcpy into warm memory at 100 MB, where
every allocation is fresh pages from the kernel.

    python -m benchmarks.codec
"""

from __future__ import annotations

import pickle

import numpy as np

from benchmarks.common import best_of, record
from pangea.wire import codec
from pangea.wire.messages import Chunk, Params, Tensor


def run(sizes_mb=(1, 10, 100)) -> list[dict]:
    rows = []
    for mb in sizes_mb:
        n = mb * (1 << 20) // 4
        array = np.random.default_rng(0).normal(size=n).astype(np.float32)
        message = Params("bench", "orchestrator", 1, False, "h", Chunk(0, 1, 0, n), Tensor.from_numpy(array))
        payload = codec.encode(message)
        target = np.empty_like(array)
        memcpy = best_of(lambda: np.copyto(target, array))
        fresh_copy = best_of(array.tobytes)
        encode = best_of(lambda: codec.encode(message))
        decode = best_of(lambda: codec.decode(payload, Params).values.numpy()[0])
        pickled = pickle.dumps(array, protocol=5)
        pickle_dumps = best_of(lambda: pickle.dumps(array, protocol=5))
        pickle_loads = best_of(lambda: pickle.loads(pickled))
        gbytes = array.nbytes / 1e9
        rows.append(
            {
                "MB": mb,
                "memcpy GB/s": gbytes / memcpy,
                "fresh copy GB/s": gbytes / fresh_copy,
                "encode GB/s": gbytes / encode,
                "encode / memcpy": memcpy / encode,
                "pickle dumps GB/s": gbytes / pickle_dumps,
                "decode ms": decode * 1e3,
                "pickle loads ms": pickle_loads * 1e3,
            }
        )
    return rows


if __name__ == "__main__":
    record("codec", run())
