"""The names of weight dtypes and training precisions, without torch.

``earlyexit.device`` maps them to torch dtypes and checks them; the CLI offers them as the
choices of ``--dtype`` and ``--precision`` at parse time, before torch is imported.
"""

from __future__ import annotations

# weight and compute dtypes at inference (``--dtype``; ``earlyexit.device.DTYPES``)
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# what ``--dtype`` offers: ``auto`` = bfloat16 where the hardware runs it natively (a CPU with
# AVX512-BF16 or AMX, a GPU with bf16 tensor cores), float32 elsewhere
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)

# training compute (``--precision``): auto = bf16 autocast where the hardware runs it natively
PRECISIONS = ("auto", "float32", "bfloat16")
