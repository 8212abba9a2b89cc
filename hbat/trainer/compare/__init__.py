"""`hbat compare [SPEC]`: several methods on the same data, seeds and budget, as the paper's Tables 1 and 4.

A SPEC is a YAML file (default: the embedded comparison, ``DEFAULT_SPEC`` below):

    set: [model.size=small]                 # overrides shared by every run (hbat train --set ...)
    runs:                                   # a method name, or a mapping with its own name and overrides
      - two_stage
      - {name: hbat-paper, method: hbat, set: [ewc.importance_mode=paper]}
    seeds: 5                                # every run on 5 seeds (the config's seed, +1, ...), or a list [0, 1, 2]
    baseline: two_stage                     # paired differences against this run (default: two_stage, else the first)
    sweep: {key: ewc.lam, values: [0.1, 10, 100], runs: [hbat]}   # trade-off curves (optional; or a list of them)
    hma: {pre: sft_only, aligned: two_stage, alphas: [0.0, 0.25, 0.5, 0.75, 1.0]}   # averaging curve (optional)
    plot: {x: eval/reward, y: eval/exact_match}   # the trade-off plane (default y: exact match, or the SFT loss)

Each seed has its own folder ``<out>/seed-<S>/``: the data, base model, SFT reference and reward model of that
seed (built once, cached in ``shared/``), then every run of the seed, each its own ``hbat train --name`` process
(its wall time and peak memory are its own). The runs of all seeds go through a pool of ``--jobs`` processes
(default: as many as the machine has cores), each with ``--threads`` threads (default 1), so the cores are used
without oversubscribing them and a run's numbers do not depend on how many runs share the machine.

``hma.pre`` names the run whose model is the aligned run's starting point (``sft_only`` runs exactly the SFT
stage of ``two_stage``: same data, order and seed); without it, the shared SFT reference is used. Its alphas
are the averaging-ratio sweep. A ``sweep`` adds, for each run it names (default: every run), one run per value
of the config key (``hbat@ewc.lam=10``); a value that gives the run's own config is the run itself.

A rerun reuses every run (and averaging curve) whose folder holds a result made with the same config, the
same thread count and the same hbat code and library versions (``code_fingerprint``); ``--fresh`` retrains.

Outputs in the output folder: compare.md (the table of means with 95% t-intervals over seeds, paired
differences from the baseline, the averaging curve, per-seed values, the commands), compare.csv (one row
per run and seed), compare.json (everything the tables are made from), compare.png (the trade-off plane) and
curves.png (the metrics over training of every run).


The package: ``spec`` (the spec and its checks), ``plan`` (every run of every seed, checked, and the code
fingerprint), ``pool`` (the processes and their dependency graph), ``report`` (intervals, tables), ``plots``
(compare.png, curves.png), ``runner`` (``compare``, the command line).
"""
from .plan import Job, Plan, code_fingerprint, evaluated_metrics, make_plan, seed_folder
from .plots import tradeoff_series
from .pool import Task, child_env, machine_cores, run_graph
from .report import build_report, claims, curve_table, diff_table, main_table, markdown, seeds_table
from .runner import build_parser, compare, hma_curve, run
from .spec import DEFAULT_SPEC, FACTS, METRICS, load_spec, normalise_runs, plot_axes, resolve_seeds

__all__ = ["DEFAULT_SPEC", "FACTS", "METRICS", "Job", "Plan", "Task", "build_parser", "build_report", "child_env",
           "claims", "code_fingerprint", "compare", "curve_table", "diff_table", "evaluated_metrics", "hma_curve",
           "load_spec", "machine_cores", "main_table", "make_plan", "markdown", "normalise_runs", "plot_axes",
           "resolve_seeds", "run", "run_graph", "seed_folder", "seeds_table", "tradeoff_series"]
