"""lmfab's data layer, split by when it runs.

Runtime (here; numpy only, what training and eval import -- the loop converts to torch):
    shards    -- the ``*.tok`` token-shard format: ``write_shard``, ``open_shard``, ``ShardWriter``
    loader    -- ``TokenDataset``, ``BatchLoader`` (rank-aware, deterministic, exactly
                 resumable), ``iterate_eval``
    mixture   -- ``MixtureLoader``: several datasets with exact weights, same guarantees

Offline preparation (``lmfab.data.prep``, no torch): raw documents -> tokenizer -> shards.
Curation (``lmfab.data.curate``, no torch): the SlimPajama recipe over document streams.

The split follows datatrove (offline steps over document streams) and Cerebras' Model Zoo
(``data_preparation/`` apart from the runtime ``data/`` input pipeline): what a training
job imports stays small, and preparation can change without touching the loader. The
shard format is the contract between the two. Nothing is imported here, so
``import lmfab.data.loader`` stays light.
"""
