"""Files in and out: the checkpoint format, named models, Hugging Face and GGUF conversion.

``io`` sits above ``models/``: it builds a :class:`~earlyexit.models.decoder.Decoder` from
files and writes one back, so the compute layer never knows a file format. Modules:
``checkpoint`` (our directory format: atomic save, validating load), ``registry`` (named
models such as ``smollm2``, converted once under ``$EARLYEXIT_HOME/models``), ``hf``
(Hugging Face import/export), ``gguf`` (llama.cpp GGUF import). Where files live
(``home()``) and how they are written atomically is ``earlyexit/files.py``, one layer down,
because ``models/``' compiled-kernel caches need it too.
"""
