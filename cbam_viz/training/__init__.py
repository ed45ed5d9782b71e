"""The training layer: from an ImageFolder dataset to shipped, measured weight records.

``data`` decodes a split once into a uint8 tensor and augments whole batches; ``recipe`` holds the
hyper-parameters every model of a lineup trains with; ``train`` runs a resumable, seeded training
(one optimisation step and one epoch's data order are their own functions); ``holdout`` chooses the
weights (raw or EMA) and input size on the held-out training files; ``export`` writes finished runs
into a weights folder (a whole lineup, or one model at a time); ``evaluate`` measures the shipped
files on a split the way the app decodes images, every member against the lineup's reference; and
``curves`` draws the training logs. Nothing here is imported by the app at request time.
"""
