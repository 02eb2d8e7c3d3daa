"""The experiment layer: `make demo` (`python -m experiments.demo`) and the study (`python -m experiments.study`).

One layer over the installed package, which never imports it: the recipes and map sources (`recipes`), one planner
and one run identity (`plan`), the step runner that runs each stage's own command line in a subprocess (`steps`), the
one reading of results.json (`results`), the statistics (`stats`), the study's report (`report`) and the figures
(`plots`). The demo is the plan of one seed and three rows; the study is the same plan with more seeds and rows, so
a demo's runs are the study's runs of that seed (in the same `--out`, they are trained once).
"""
