"""The corpus stage's public face: what other stages and the experiment runner may call."""

from __future__ import annotations

from corpus.catalog import load_audiences, load_genres
from corpus.plan import PlanRow, make_plan
from corpus.spec import Spec, load_spec


def build(spec_path: str, **options):
    """Run a whole corpus build; options are pipelines.build.BuildOptions fields."""
    from pipelines.build import BuildOptions, build_corpus

    return build_corpus(spec_path, BuildOptions(**options))


__all__ = ["PlanRow", "Spec", "build", "load_audiences", "load_genres", "load_spec", "make_plan"]
