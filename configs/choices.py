"""The lists of named choices that are not registries, each declared once, in the lowest layer.

The command line (``configs.schema``), its checks and the code that implements each choice read the
same tuple: the selector its granularities and scopes, the data its ``--decode`` modes, the results
report its modes. Choices implemented by a dict of functions elsewhere (optimizers, learning-rate
schedules, score inits) are checked against their tuple here by tests/test_docs.py; the choices of
one option section (BiP's, WoodFisher's, --amp's, ...) are declared beside that section in
``configs.options``, and tests/test_docs.py checks those implemented elsewhere (the --amp dtypes,
the evaluations, the objectives) the same way.
"""

MODES = ("pretrain", "prune", "finetune")
DECODE_MODES = ("auto", "cpu", "gpu")
GRANULARITIES = ("unstructured", "filter", "channel", "nm")
LAYER_TYPES = ("dense", *GRANULARITIES)  # dense: plain layers, no mask (pretrain)
SCOPES = ("global", "layer")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
SCHEDULES = ("constant", "cosine", "step")
SCORE_INITS = ("kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal")
