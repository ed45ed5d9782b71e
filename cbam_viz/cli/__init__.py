"""Command line: ``python -m cbam_viz {train,evaluate,explain,evaluate-cams,...}`` (also ``cbam-viz``).

Each sub-command is a thin layer: parse arguments, call the library, print. One module per group
of commands registers its parsers (``add_parsers``) and holds their handlers: :mod:`.training`,
:mod:`.explain`, :mod:`.research`, :mod:`.models`; :mod:`.checks` checks arguments before a command
starts, :mod:`.errors` turns any failure into one sentence and an exit status, :mod:`.help` adds
defaults, method names, ``--overwrite`` and the ``app`` command to every parser.
"""
from __future__ import annotations

import argparse

from cbam_viz import distributed
from cbam_viz.cli import explain, models, research, training
from cbam_viz.cli.errors import run_command
from cbam_viz.cli.help import extend_parser
from cbam_viz.research.ood_fit import add_parser as add_ood_parser

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """Every sub-command, in the order ``--help`` lists them."""
    parser = argparse.ArgumentParser(prog="python -m cbam_viz", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    training.add_parsers(sub)    # train, evaluate, plot-curves
    models.add_parsers(sub)      # add-model, add-lineup, model-card
    explain.add_parsers(sub)     # explain
    research.add_parsers(sub)    # evaluate-cams, ablate-gates, channel-profiles, sanity-check
    add_ood_parser(sub)          # fit-ood
    return extend_parser(parser, sub)  # defaults and method names in --help, --overwrite, the `app` command


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = run_command(args)  # checks, then the command; any failure -> one sentence and an exit status
    if status == 0:
        distributed.leave()  # under torchrun: no rank exits while another still talks to it
    return status
