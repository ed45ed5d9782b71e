"""What the web app (``app.py``) shows, computed without Gradio: one call per event.

``app.py`` holds the layout and the wiring only; each of its event functions calls one function
of these modules and maps the named result onto its components. Nothing is read at import: the
lineups, examples and the Explanation-quality report load with the page.

- :mod:`~cbam_viz.app.content`   what the page loads once (quality report, examples, sanity flags)
- :mod:`~cbam_viz.app.text`      the page's sentences and tables (markdown)
- :mod:`~cbam_viz.app.items`     one explained photo as the page keeps it, member by member
- :mod:`~cbam_viz.app.results`   the Explain tab: results, picker, examples, compare slider, downloads
- :mod:`~cbam_viz.app.gates`     "what the gates did": channel plot data, click probe, gate ablation
- :mod:`~cbam_viz.app.page`      the page as it opens, and what depends on the chosen lineup
- :mod:`~cbam_viz.app.upload`    a local user's own checkpoint, added from the page
- :mod:`~cbam_viz.app.quality`   the Explanation-quality tab's queries
- :mod:`~cbam_viz.app.api`       ``/explain`` and ``/info``
"""
