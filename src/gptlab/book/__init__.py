"""The lecture API: the course's names and signatures, running on gptlab.

A notebook written for the course (S. Raschka, *Build a Large Language Model
(From Scratch)*, chapters 2-7 and appendix E) runs with one changed import::

    from gptlab.book import GPTModel, GPT_CONFIG_124M, generate, train_model_simple, ...

Each name keeps the course's semantics, so seeded runs print the course's
numbers (``torch.manual_seed(123); GPTModel(GPT_CONFIG_124M)`` gives the
untrained loss 10.7940 on the chapter-5 batch). Each docstring names the gptlab
API that does the same at full strength, and :func:`book_to_gptlab` /
:func:`gptlab_to_book` move a model between the two mid-course.

One module per chapter: ``ch02`` text data, ``ch03`` attention, ``ch04`` the
GPT model, ``ch05`` pretraining (+ ``gpt_download``), ``ch06`` classification,
``ch07`` instruction tuning, ``appendix_e`` LoRA; ``convert`` bridges to gptlab.
"""

from gptlab.book.appendix_e import LinearWithLoRA, LoRALayer, replace_linear_with_lora
from gptlab.book.ch02 import (GPTDatasetV1, SimpleTokenizerV1, SimpleTokenizerV2, build_vocab,
                              create_dataloader_v1, gpt2_tokenizer, split_words)
from gptlab.book.ch03 import (CausalAttention, MultiHeadAttention, MultiHeadAttentionWrapper, SelfAttention_v1,
                              SelfAttention_v2)
from gptlab.book.ch04 import (GELU, GPT_CONFIG_124M, FeedForward, GPTModel, LayerNorm, TransformerBlock,
                              generate_text_simple, model_configs)
from gptlab.book.ch05 import (assign, calc_loss_batch, calc_loss_loader, evaluate_model, generate,
                              generate_and_print_sample, load_weights_into_gpt, plot_losses, text_to_token_ids,
                              token_ids_to_text, train_model_simple)
from gptlab.book.ch06 import (SpamDataset, calc_accuracy_loader, classify_review, create_balanced_dataset,
                              load_sms_spam, prepare_spam_csvs, random_split, train_classifier_simple, write_csv)
from gptlab.book.ch07 import custom_collate_fn, format_input, generate_model_scores, InstructionDataset, query_model
from gptlab.book.convert import book_to_gptlab, gptlab_to_book
from gptlab.book.gpt_download import download_and_load_gpt2

__all__ = [
    # chapter 2
    "SimpleTokenizerV1", "SimpleTokenizerV2", "GPTDatasetV1", "create_dataloader_v1", "build_vocab", "split_words",
    "gpt2_tokenizer",
    # chapter 3
    "SelfAttention_v1", "SelfAttention_v2", "CausalAttention", "MultiHeadAttentionWrapper", "MultiHeadAttention",
    # chapter 4
    "LayerNorm", "GELU", "FeedForward", "TransformerBlock", "GPTModel", "generate_text_simple", "GPT_CONFIG_124M",
    "model_configs",
    # chapter 5
    "text_to_token_ids", "token_ids_to_text", "calc_loss_batch", "calc_loss_loader", "evaluate_model",
    "generate_and_print_sample", "train_model_simple", "generate", "plot_losses", "download_and_load_gpt2",
    "load_weights_into_gpt", "assign",
    # chapter 6
    "SpamDataset", "calc_accuracy_loader", "train_classifier_simple", "classify_review", "load_sms_spam",
    "create_balanced_dataset", "random_split", "write_csv", "prepare_spam_csvs",
    # chapter 7
    "format_input", "InstructionDataset", "custom_collate_fn", "query_model", "generate_model_scores",
    # appendix E
    "LoRALayer", "LinearWithLoRA", "replace_linear_with_lora",
    # bridge to the full toolkit
    "book_to_gptlab", "gptlab_to_book",
]
