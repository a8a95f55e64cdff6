"""wandacli: find which weights of a chat model carry its safety behaviour.

The package in folders by concern, bottom to top; each imports only from those below it
(tests/test_architecture.py checks this on every import, function-level ones included):

    core/        errors, console, atomic files and directories, fingerprints, memory, paths,
                 the process group of a multi-process run,
                 the file-safe naming rule, provenance, the metric and judge names, the
                 reference's constants
    config/      each option declared once (declare.py), frozen settings per command, TOML files
    store/       the on-disk schema: formats, open/validate, the one assembly loop, lock, parts, inspect
    data/        calibration and evaluation sets: named sources, files, templates, prompt masking
    models/      the one loader (sources, GGUF conversion, from_pretrained), decoder layers, the organism
    methods/     one file per attribution method (wanda, wandg, magnitude, random, actsvd) and their base
    scoring/     the generic score run (resume, sample loop, checkpoints)
    removal/     what to remove: one module per kind (removal/kinds/, a registry), the one
                 in-memory form every removal takes and the one way it reaches a model, the
                 prune runs that write masks and edits, the selection and rank math
    evaluation/  the model under test, attack prompts, judges (evaluation/judges/, one module
                 each), generation backends, utility, the KL cost, refusal measures,
                 degenerate responses and word salad, judging stored responses again
    training/    `wandacli finetune`: the fine-tuning attack with a mask's weights frozen or
                 rewound, the transplant, attack pairs answered by a named model
    search/      `wandacli search`: the Optuna study in the store, a trial's removal by its kind
    analysis/    what stored results say: compare, subspaces, directions, the results' rows,
                 how judges agree
    reporting/   rendering only: the terminal, figures, the report's table and Markdown
    legacy.py    import-legacy: the reference code's pickles into the store
    pipeline.py  the study as Make rules (python -m wandacli.pipeline)
    cli/         the Typer app, shared options, one module per command
"""

__version__ = "0.1.0"
