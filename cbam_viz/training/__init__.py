"""The training layer: from an ImageFolder dataset to shipped, measured weight records.

``data`` decodes a split once into a uint8 tensor and augments whole batches; ``recipe`` holds the
hyper-parameters every member of a lineup trains with and their schedules; ``step`` is one
optimisation step and the data order of an epoch; ``train`` runs a resumable, seeded training in
named steps (``ema`` keeps the weight average, ``monitor`` scores the monitored split; ``split``
loads what a run reads, cached in memory or, through ``stream``, decoded per step from the files;
``parallel`` shares each batch among the processes of a ``torchrun`` job);
``holdout`` chooses the weights (raw or EMA) and input size on the held-out training files;
``export`` writes finished runs into a weights folder (a whole lineup, or one model at a time);
``evaluate`` measures the shipped files on a split the way the app decodes images, and
``compare`` sets every member against the lineup's reference; ``curves`` draws the training logs.
Only the CLI and the research commands import this package; the app's request path does not.
"""
