"""The lab: a tiny text-to-image world in which fine-tuning jailbreaking can be reproduced on CPU.

* :mod:`auditkit.lab.world` -- procedural images, captions, concepts and domains (numpy only);
* :mod:`auditkit.lab.tokenizer` -- a word-level ``CLIPTokenizer`` for the world's vocabulary;
* :mod:`auditkit.lab.model` -- the tiny ``StableDiffusionPipeline`` (real diffusers classes) and
  :func:`~auditkit.lab.model.load_lab_pipeline`;
* :mod:`auditkit.lab.detector` -- the shipped concept detector (shape/colour/style CNN);
* :mod:`auditkit.lab.adherence` -- prompt-adherence measurement;
* ``scripts/lab_train_*.py`` (not installed) -- training loops used by ``scripts/train_lab.py``;
  checkpoints are safetensors (:func:`auditkit.train.checkpoint.save_tree`), never pickle.

Only :mod:`world` and :mod:`tokenizer`'s file writing are importable without torch.
"""
