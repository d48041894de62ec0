"""lmfab's data layer: from raw documents to token windows for the training loop.

Offline pipeline (no torch):
    readers   -- ``iter_documents``: jsonl / jsonl.zst / txt / md files and folders -> Documents
    tokenizer -- ``train_tokenizer``: byte-level BPE from a weighted streaming sample
    fertility -- ``fertility_report``: tokens/word and bytes/token per source and language
    pack      -- ``pack_corpus``: encode on all cores (resumable per file), pack one stream
                 into shards at one or more seq_lens; ``meta.json`` per MSL, ``pack.json``
    tokenize  -- ``tokenize_corpus``: train (or load) a tokenizer + pack at one seq_len, in
                 the flat single-MSL layout (``make demo``)
    shards    -- the ``*.tok`` token-shard format: ``write_shard``, ``open_shard``, ``ShardWriter``

Runtime (numpy only; the training loop converts to torch):
    loader    -- ``TokenDataset``, ``BatchLoader`` (rank-aware, deterministic, exactly
                 resumable), ``iterate_eval``
    mixture   -- ``MixtureLoader``: several datasets with exact weights, same guarantees

Nothing is imported here, so ``import lmfab.data.loader`` stays light.
"""
