"""The data pipeline: dataset -> token batch.

    loading        load / load_splits: Hub id, local json/jsonl/parquet/csv (file or folder), in-memory
    formats        detect_format / check_format / validate_rows: TRL's dataset formats, standard and
                   conversational; extract_prompt / with_explicit_prompt for implicit-prompt preferences
    tokenization   tokenize_prompt(s), tokenize_prompt_completion(s), tokenize_sft (TRL 1.16 semantics);
                   tokenize_conversation(s): ids + assistant mask from any chat template (markers or derived)
    collate        pad_collate, padding_free_collate, pack (best fit decreasing), packed_collate;
                   for_attention: packed rows as one row where flash attention needs it
    embedded       the offline tokenizer, tiny model and synthetic task

Import the submodules directly; this package imports nothing, so `import posttrain.data` stays cheap.
"""
