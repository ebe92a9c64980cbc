"""Weight-editing baselines FT, MEMIT, PMET and AlphaEdit, written natively on the package's adapters.

Shared locate-then-edit machinery: :mod:`plan` (tokenised edit prompts, subject positions), :mod:`keys`
(representations at a module's input/output), :mod:`values` (z optimisation), :mod:`stats` (streaming
second moments of keys over a corpus, cached), :mod:`locate` (the layer loop), :mod:`delta` (the artifact:
the changed tensors, applied and restored bit-exactly). Each method module registers its Editor.
"""
