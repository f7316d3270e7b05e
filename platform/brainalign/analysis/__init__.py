"""Analyses of finished runs: top-5 retrieval image grids and gradient attributions.

Everything here starts from runs that finished in MLflow (their resolved config, checkpoint
and test rankings are artifacts), so it works for any aligned/base pair a sweep or
``brainalign train`` produced:

* :mod:`brainalign.analysis.grids`: the paper's Figs. 5-7 (a test query's image, the aligned
  and the base model's top-5 retrieved images with cosine similarities), for the test gallery
  and the test+train gallery;
* :mod:`brainalign.analysis.explain`: the paper's Section 5.5 / App. G gradient analysis
  (Grad-CAM and integrated gradients; temporal, spectral and spatial views; subject-level
  paired tests, aligned vs base).

Import the submodules directly; this package imports nothing heavy.
"""
