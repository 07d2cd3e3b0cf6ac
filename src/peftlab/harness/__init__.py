"""The experiment harness the chapters train with: the byte-level texts
(:mod:`~peftlab.harness.textdata`),
the tiny pretrained LLaMA (:mod:`~peftlab.harness.pretrained`) and finetuning runs, cached
and swept (:mod:`~peftlab.harness.experiments`). It builds on the science modules and
never on the book's machinery.
"""
