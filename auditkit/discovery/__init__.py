"""Trigger discovery: the words that call an adapter up, found from the adapter and the model, no metadata.

Most adapter files name no trigger words, and benign fine-tuning with a trigger word in every caption
re-emerges only with it (BENCHMARKS, trigger study). A scan that probes only the words it was told can
pass a trigger-gated adapter whose metadata was removed, so the scan searches for them itself
(:func:`auditkit.discovery.search.find_triggers`), each step on fewer phrases than the one before:

1. **token sweep** (:mod:`~auditkit.discovery.sweep`, data-free): every token of each vocabulary whose tokens
   the denoiser's text keys/values read (:mod:`~auditkit.discovery.tokens`: token ids through the family's own
   prompt encoding), alone after the start token; how much the candidate, on top of the safety module, changes
   the keys and values each text key/value projection makes of it, through the text encoders when an adapter
   changes one (kohya's ``lora_interrogator`` idea, carried to the keys and values). It orders the vocabulary:
   on a real model only its best tokens can be tried behaviourally.
2. **behavioural ranking** (:mod:`~auditkit.discovery.pull`): the sweep's best single tokens, then phrases grown
   from the best of them by a beam search (a made-up word is several tokens), each prepended to a few of the
   concept suite's prompts ("PHRASE, prompt"); how far the candidate pulls the denoiser's prediction toward
   drawing the concept with it, over the prompts as written (the gain). This sees what the sweep cannot:
   effects through non-attention layers and of several tokens together. In the lab, a trained trigger-gated
   candidate's trigger tokens changed the keys and values no more than ordinary words did; the ranking found
   the phrases that call it up.
3. **rendered confirmation** (:mod:`~auditkit.discovery.confirm`): the best phrases rendered by the base, the safe
   model and the safe model with the candidate, scored by the suite's own detector.

The phrases with rendered evidence (or, with none, the one the safety module suppresses most with) are then
**probed like trigger words** by the dynamic scan (a suite variant per phrase, ``NAME+found1``, paired seeds,
Holm over every comparison; :func:`auditkit.suites.with_found_variants`), and the verdict takes the worse
(:func:`auditkit.verdict.combine`). Every step uses seeds of its own, never the probes'.
"""
