"""Fine-tuning recipes, each a plug-in to the one training loop (:func:`gptlab.training.train_loop`).

    classify.py   an n-class classifier on the last token (the course's chapter 6)
    instruct.py   instruction tuning with prompt masking (chapter 7)
    lora.py       low-rank adapters, merge, peft-compatible save/load (appendix E)
    distill.py    knowledge distillation from a teacher model
    surgery.py    find/replace the output head, freezing policies (shared by all)
"""
