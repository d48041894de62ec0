"""Data curation: the SlimPajama recipe as a resumable pipeline over document streams.

    lmfab data curate configs/data/default.yaml --set read.inputs=[../shared/corpus] \
        --set write.output=runs/curated [--workers N] [--executor ray --address HOST:PORT]

Modules:
    recipe    -- the strict recipe schema (one section per stage), ``load_recipe``
    text      -- cleaning, SlimPajama normalization, named filters, exact-dedup hash
    minhash   -- vectorized MinHash signatures (one-permutation or 128 permutations), LSH keys
    dedup     -- global exact + near dedup over keys; connected components
    steps     -- the per-document steps of a map task (read, clean, filter), each with its
                 own per-source counters
    tasks     -- the named task records and the map / shingle / scatter / gather functions
                 that executors run
    executor  -- local process pool or Ray
    pipeline  -- ``curate(recipe)``: phases, resume markers, plan (mix / split / decontaminate)
    stats     -- stats.json and SlimPajama's per-source byte-reduction table

The offline pipeline never imports torch (tests/test_data_layout.py checks it).
See docs/curation.md.
"""

from lmfab.data.curate.recipe import Recipe, load_recipe, recipe_from_dict


def curate(recipe: Recipe, **kwargs):
    """Run a recipe; see :func:`lmfab.data.curate.pipeline.curate`."""
    from lmfab.data.curate.pipeline import curate as _curate

    return _curate(recipe, **kwargs)


__all__ = ["Recipe", "curate", "load_recipe", "recipe_from_dict"]
