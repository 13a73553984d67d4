"""Data layer: sources -> canonical examples -> token ids -> fixed-shape numpy batches -> iterator.

Typical use::

    rows = load_rows("hh-rlhf/test.jsonl.gz", split="test")
    pairs, report = tokenize_preference_dataset(rows, tok, max_length=512, max_prompt_length=256)
    collate = functools.partial(build_preference_batch, seq_len=512, pad_id=pad_id_for(tok))
    it = BatchIterator(pairs, batch_size=32, collate_fn=collate, seed=0)
    batch = next(it)  # {"tokens": int32[32, 2, 512], ...}
"""
from jaxrlhf.data.batching import (
    LM_KEYS,
    build_classification_batch,
    build_lm_batch,
    build_preference_batch,
    build_prompt_batch,
    build_ranked_batch,
    pack_lm_examples,
    stack_examples,
    unstack_batch,
)
from jaxrlhf.data.formats import (
    ClassificationExample,
    HHSplit,
    Message,
    PreferenceExample,
    Prompt,
    PromptExample,
    RankedExample,
    SFTExample,
    classification_examples,
    hh_to_messages,
    imdb_prefix,
    imdb_prompt_examples,
    preference_examples,
    prompt_examples,
    prompt_to_messages,
    ranked_examples,
    ranks_from_scores,
    sft_examples,
    split_hh_pair,
)
from jaxrlhf.data.iterator import BatchIterator, train_eval_split
from jaxrlhf.data.sources import DatasetFetchError, load_rows
from jaxrlhf.data.tokenize import (
    ClassificationTokens,
    PreferenceTokens,
    RankedTokens,
    SFTTokens,
    TruncationReport,
    encode_pair,
    encode_prompt,
    encode_response,
    encode_text,
    eos_ids_for,
    pad_id_for,
    tokenize_classification_dataset,
    tokenize_preference_dataset,
    tokenize_prompt_dataset,
    tokenize_ranked_dataset,
    tokenize_sft_dataset,
    truncate_pair,
)

__all__ = [
    "LM_KEYS", "build_classification_batch", "build_lm_batch", "build_preference_batch", "build_prompt_batch",
    "build_ranked_batch", "pack_lm_examples", "stack_examples", "unstack_batch", "ClassificationExample",
    "HHSplit", "Message", "PreferenceExample", "Prompt", "PromptExample", "RankedExample", "SFTExample",
    "classification_examples", "hh_to_messages", "imdb_prefix", "imdb_prompt_examples", "preference_examples",
    "prompt_examples", "prompt_to_messages", "ranked_examples", "ranks_from_scores", "sft_examples",
    "split_hh_pair", "BatchIterator", "train_eval_split", "DatasetFetchError", "load_rows",
    "ClassificationTokens", "PreferenceTokens", "RankedTokens", "SFTTokens", "TruncationReport",
    "encode_pair", "encode_prompt", "encode_response", "encode_text", "eos_ids_for", "pad_id_for",
    "tokenize_classification_dataset", "tokenize_preference_dataset", "tokenize_prompt_dataset",
    "tokenize_ranked_dataset", "tokenize_sft_dataset", "truncate_pair",
]
