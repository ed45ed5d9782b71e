"""The research layer: measurements over a dataset that say whether what the app shows holds up.

Every command here runs on a :class:`~cbam_viz.engine.lineup.Lineup` (1 to 4 members, one of them the
reference) and compares each other member with the reference by a paired difference over the
same images, with a bootstrap interval; a lineup of one is measured without comparisons.

* :mod:`~cbam_viz.research.quality`: ``evaluate-cams`` (do the CAMs localize the boxed object,
  and are they faithful?), the spatial-gate localization, the report and the app's
  Explanation-quality tab (its forest plot, its images);
* :mod:`~cbam_viz.research.gate_ablation`: switch gates off (or to their mean) and watch the
  prediction and the CAM, for any gated model whatever its gates (CBAM, SE, BAM);
  :mod:`~cbam_viz.research.ablation_report`: the same over a dataset for every gated member
  (``ablate-gates``);
* :mod:`~cbam_viz.research.channel_profiles`: per-class channel-gate profiles of every member with
  channel gates (``channel-profiles``), their files in :mod:`~cbam_viz.research.profile_files`;
* :mod:`~cbam_viz.research.sanity`: the model-randomisation test of the CAM methods (``sanity-check``),
  its files in :mod:`~cbam_viz.research.sanity_files`;
* :mod:`~cbam_viz.research.shards`: the four dataset commands above under ``torchrun`` (the ranks
  share the images, rank 0 writes the one-process report);
* :mod:`~cbam_viz.research.ood_fit` / :mod:`~cbam_viz.research.ood_eval`: fit and compare the
  out-of-distribution scores (``fit-ood``).

Nothing here is on the app's request path except the lazily loaded report readers.
"""
