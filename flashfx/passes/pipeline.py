"""The compile pipeline: one flat list of named passes over the Dynamo graph."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from torch import fx

from flashfx import config
from flashfx.passes.match import AttentionSite, find_sites
from flashfx.passes.normalize import normalize
from flashfx.passes.rewrite import rewrite
from flashfx.passes.structure import resolve_static_masks

log = logging.getLogger("flashfx")

# Totals over the process, as inductor keeps them: tests assert that a rewrite really happened.
counters: Counter = Counter()


@dataclass
class PassResult:
    sites: list[AttentionSite] = field(default_factory=list)
    counters: dict = field(default_factory=dict)


def _normalize(gm, example_inputs, result):
    result.counters["normalized"] = normalize(gm)


def _match(gm, example_inputs, result):
    result.sites = find_sites(gm)
    result.counters["sites"] = len(result.sites)


def _structure(gm, example_inputs, result):
    for site in result.sites:
        resolve_static_masks(site, gm, example_inputs)


def _rewrite(gm, example_inputs, result):
    result.counters["rewritten"] = rewrite(gm, result.sites, config.max_rewrites)
    counters["sites"] += len(result.sites)
    counters["rewritten"] += result.counters["rewritten"]


PASSES = [
    ("normalize", _normalize),
    ("match", _match),
    ("structure", _structure),
    ("rewrite", _rewrite),
]


def run(gm: fx.GraphModule, example_inputs, *, stop_after: str | None = None) -> PassResult:
    """Run the passes in order on `gm` (in place); `stop_after` names the last one to run."""
    result = PassResult()
    for name, fn in PASSES:
        fn(gm, example_inputs, result)
        if config.debug:
            log.warning("flashfx pass %s: %s", name, result.counters)
        if name == stop_after:
            break
    return result
