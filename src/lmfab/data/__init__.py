"""lmfab's data layer: from raw documents to token windows for the training loop.

Offline pipeline (no torch):
    readers   -- ``iter_documents``: jsonl / jsonl.zst / txt / md files and folders -> Documents
    tokenize  -- ``tokenize_corpus``: train or load a byte-level BPE, split train/val, pack
                 documents (EOS-separated) into windows of seq_len + 1 tokens; ``meta.json``
    shards    -- the ``*.tok`` token-shard format: ``write_shard``, ``open_shard``, ``ShardWriter``

Runtime (numpy only; the training loop converts to torch):
    loader    -- ``TokenDataset``, ``BatchLoader`` (rank-aware, deterministic, exactly
                 resumable), ``iterate_eval``

Nothing is imported here, so ``import lmfab.data.loader`` stays light.
"""
