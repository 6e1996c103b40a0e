"""``make reproduce``: the paper's four variants on the testbed, their analysis, and the picture of both pathologies
forming in the baseline and not in the treated models.

    python -m ds_orthoadam.reproduce --seed 0 --out runs/reproduce

Trains baseline (softmax + AdamW), softmax-1 + AdamW, softmax + OrthoAdam and softmax-1 + OrthoAdam with the testbed
preset (:mod:`ds_orthoadam.testbed`), runs one ``ds-orthoadam-analyze`` over the four exports (``OUT/analysis``:
analysis.json with the models labelled ``baseline``, ``softmax1``, ``orthoadam``, ``softmax1+orthoadam``, report.md,
the plots), draws the live outlier telemetry of every run against training step (``OUT/analysis/telemetry.png``) and
checks the acceptance criteria (``OUT/acceptance.md``; exit status 1 if one fails). ``--extra`` adds
OrthoAdam with dense rotations and with single-scale RMSNorm. Re-running resumes: finished runs are skipped,
interrupted ones continue from their last checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ds_orthoadam import testbed
from ds_orthoadam.analysis.curves import plot_telemetry
from ds_orthoadam.cli import ensure_output_dir, integer_at_least, report_error
from ds_orthoadam.errors import UserError
from ds_orthoadam.testbed_acceptance import Criterion, acceptance_table, check_acceptance

EXIT_CRITERIA_NOT_MET = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ds_orthoadam.reproduce", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seed", type=integer_at_least(0), default=0,
                        help="seed of model initialisation, data order and OrthoAdam's rotations")
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="output directory")
    parser.add_argument("--data", type=Path, default=Path("data/testbed"),
                        help="the testbed's data directory (generated there if missing)")
    parser.add_argument("--steps", type=integer_at_least(1), default=testbed.STEPS, help="optimiser steps per run")
    parser.add_argument("--extra", action="store_true",
                        help="also train OrthoAdam with dense rotations and with single-scale RMSNorm (6 runs)")
    parser.add_argument("--analysis-docs", type=integer_at_least(1), default=testbed.ANALYSIS_DOCS,
                        help="validation documents of the final analysis")
    return parser


def reproduce(args: argparse.Namespace) -> list[Criterion]:
    """Train what is not trained yet, analyse, plot, and return the acceptance criteria with their measurements."""
    ensure_output_dir(args.out, "--out")
    testbed.ensure_data(args.data)
    variants = list(testbed.PAPER_VARIANTS) + (list(testbed.EXTRA_VARIANTS) if args.extra else [])
    for variant in variants:
        testbed.train(variant, args.out, args.data, steps=args.steps, seed=args.seed)
    analysis = testbed.analyze(variants, args.out, args.data, documents=args.analysis_docs)
    figure = plot_telemetry({variant.label: testbed.run_dir(args.out, variant) / "metrics.jsonl"
                             for variant in variants}, args.out / "analysis" / "telemetry.png")
    results = check_acceptance(analysis)
    table = acceptance_table(results)
    (args.out / "acceptance.md").write_text(f"# Acceptance on the testbed (seed {args.seed}, {args.steps} steps)\n\n"
                                            f"{table}\n", encoding="utf-8")
    print(f"\n{table}\n\nreport: {args.out / 'analysis' / 'report.md'}\ntelemetry: {figure}")
    return results


def main(argv: list[str] | None = None) -> int:
    """Exit status 0: every criterion met; 1: a criterion not met (the table says which); 2: bad input or a failed
    step (one error line)."""
    args = build_parser().parse_args(argv)
    try:
        results = reproduce(args)
    except UserError as error:
        return report_error(error)
    failed = [result.criterion for result in results if not result.passed]
    if failed:
        print(f"reproduce: {len(failed)} of {len(results)} acceptance criteria not met: {'; '.join(failed)}",
              file=sys.stderr)
        return EXIT_CRITERIA_NOT_MET
    print(f"all {len(results)} acceptance criteria met ({args.out / 'acceptance.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
