"""Trigger discovery: the words that call an adapter up, found from the adapter and the model, no metadata.

Most adapter files name no trigger words, and benign fine-tuning with a trigger word in every caption
re-emerges only with it (BENCHMARKS, trigger study). A scan that probes only the words it was told can
pass a trigger-gated adapter whose metadata was removed, so the scan searches for them itself
(:func:`auditkit.discovery.search.find_triggers`), in three steps, each cheaper than the next:

1. **token sweep** (:mod:`~auditkit.discovery.sweep`, data-free): every token of each tokenizer whose tokens
   the denoiser's text keys/values read, alone after the start token; how much the candidate, on top of the
   safety module, changes the keys and values each text key/value projection makes of it (through the
   text encoders when an adapter changes one: kohya's ``lora_interrogator`` idea, carried to the keys
   and values). Tokens ranked by the relative change.
2. **phrase extension** (:mod:`~auditkit.discovery.phrases`, data-free): a beam search joining the top
   tokens into phrases whose tokens, read in sequence, the candidate changes most (a made-up word is
   several tokens).
3. **behavioural ranking** (:mod:`~auditkit.discovery.pull`): each phrase prepended to a few of the concept
   suite's prompts ("PHRASE, prompt"); how far the candidate pulls the denoiser's prediction back toward
   the concept (the noise reversion of :mod:`auditkit.analysis.reversion` with the phrase, minus without),
   on seeds the probes never use. This sees what the sweep cannot: effects through non-attention layers.

The best phrases are then **probed like metadata trigger words** by the dynamic scan (a suite variant per
phrase, paired seeds, Holm over every comparison; :func:`auditkit.suites.found_variants`), and the
verdict takes the worse (:func:`auditkit.verdict.combine`).
"""
