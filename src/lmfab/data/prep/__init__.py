"""Offline data preparation: raw documents -> BPE tokenizer -> packed token shards.

    readers         -- ``iter_documents``: jsonl / jsonl.zst / txt / md files and folders
                       -> ``Document`` stream (curation reads through it too)
    bpe_train       -- ``train_tokenizer``: byte-level BPE from a weighted streaming sample
                       (``lmfab data tokenizer train``)
    fertility       -- ``fertility_report``: tokens/word and bytes/token per source and
                       language (``lmfab data tokenizer report``)
    encode          -- stage 1 of packing: encode files to token ids on all cores, resumable
                       per file
    tiktoken_bpe    -- the faster, token-for-token identical tiktoken encoder that ``encode``
                       uses for GPT-2-style tokenizers
    pack            -- ``pack_corpus``: encode + pack one stream into shards at one or more
                       seq_lens (``lmfab data pack``)
    tokenize_corpus -- ``tokenize_corpus``: train (or load) a tokenizer and pack at one
                       seq_len in the flat layout, in one command (``lmfab data tokenize``,
                       ``make demo``)
    progress        -- the progress display of these commands

Runs once per dataset, never inside a training job, and imports no torch (a test checks it
in a fresh interpreter). Its output is read by the runtime modules in :mod:`lmfab.data`.
Nothing is imported here, so importing one step does not load the others.
"""
