"""Chapter 5 of the course: pretraining on unlabeled data.

Loss and perplexity, the simple training loop, temperature / top-k sampling,
plotting the loss curves, and loading OpenAI's GPT-2 weights into ``GPTModel``.

These functions keep the course's semantics exactly (global ``torch`` random
state, no gradient clipping, no learning-rate schedule in
``train_model_simple``), so a seeded notebook prints the course's numbers.
The full-strength equivalents add what a real run needs:

    train_model_simple  ->  gptlab.training.loop.train_loop / ``gptlab train``
                            (warmup + cosine schedule, clipping, mixed precision,
                            checkpoints with exact resume, early stopping)
    generate            ->  gptlab.generate (KV cache, top-p / min-p, seeds,
                            repetition penalty)
    calc_loss_loader    ->  ``gptlab eval`` (loss and perplexity of a corpus)
    plot_losses         ->  the run directory's loss.png
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from gptlab.errors import GptlabError


def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    """Token ids of ``text`` as a (1, T) tensor (``<|endoftext|>`` allowed)."""
    try:
        encoded = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    except TypeError:  # a tokenizer without tiktoken's allowed_special keyword
        encoded = tokenizer.encode(text)
    return torch.tensor(encoded).unsqueeze(0)  # add the batch dimension


def token_ids_to_text(token_ids: torch.Tensor, tokenizer) -> str:
    """Text of a (1, T) or (T,) tensor of token ids."""
    flat = token_ids.squeeze(0)  # drop the batch dimension
    return tokenizer.decode(flat.tolist())


def calc_loss_batch(input_batch: torch.Tensor, target_batch: torch.Tensor, model, device) -> torch.Tensor:
    """Mean cross-entropy of one batch.

    Language modelling (chapter 5): targets (b, T) next-token ids, loss over every
    position. Classification (chapter 6): targets (b,) class labels, loss on the
    last position's logits only — the course redefines this function in chapter 6;
    here the target's shape picks the variant.
    """
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    if target_batch.dim() == 1:
        return F.cross_entropy(logits[:, -1, :], target_batch)  # (b, classes) vs (b,)
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())  # (b·T, V) vs (b·T,)


def calc_loss_loader(data_loader, model, device, num_batches: int | None = None) -> float:
    """Average :func:`calc_loss_batch` over the first ``num_batches`` batches (default: all).

    Returns ``nan`` for an empty loader, as the course does.
    """
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total_loss = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def evaluate_model(model, train_loader, val_loader, device, eval_iter: int) -> tuple[float, float]:
    """Train and validation loss over ``eval_iter`` batches each, in eval mode without gradients."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(model, tokenizer, device, start_context: str) -> None:
    """Print a 50-token greedy continuation of ``start_context`` on one line."""
    from gptlab.book.ch04 import generate_text_simple

    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    with torch.no_grad():
        token_ids = generate_text_simple(model=model, idx=encoded, max_new_tokens=50, context_size=context_size)
    decoded_text = token_ids_to_text(token_ids, tokenizer)
    print(decoded_text.replace("\n", " "))  # compact print format
    model.train()


def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs: int, eval_freq: int,
                       eval_iter: int, start_context: str, tokenizer) -> tuple[list[float], list[float], list[int]]:
    """The course's training loop; returns ``(train_losses, val_losses, track_tokens_seen)``.

    Every ``eval_freq`` optimizer steps it evaluates ``eval_iter`` batches of each
    loader and prints ``Ep E (Step NNNNNN): Train loss ..., Val loss ...``; after
    each epoch it prints a greedy sample from ``start_context``.
    Full strength: ``gptlab.training.loop.train_loop`` (``gptlab train``).
    """
    if eval_freq < 1 or eval_iter < 1:
        raise GptlabError(f"eval_freq={eval_freq} and eval_iter={eval_iter} must both be >= 1")
    if len(train_loader) == 0:
        raise GptlabError("the training loader has no batches; use a longer text, a smaller max_length "
                          "or batch_size, or drop_last=False")
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()  # reset the previous step's gradients
            loss = calc_loss_batch(input_batch, target_batch, model, device)
            loss.backward()
            optimizer.step()
            tokens_seen += input_batch.numel()
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
                track_tokens_seen.append(tokens_seen)
                print(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
        generate_and_print_sample(model, tokenizer, device, start_context)
    return train_losses, val_losses, track_tokens_seen


def generate(model, idx: torch.Tensor, max_new_tokens: int, context_size: int, temperature: float = 0.0,
             top_k: int | None = None, eos_id: int | None = None) -> torch.Tensor:
    """Decode with optional top-k filtering and temperature sampling (the course's ``generate``).

    Per step: keep the ``top_k`` largest logits (others -> -inf); if
    ``temperature > 0`` divide by it and sample from the softmax with
    ``torch.multinomial`` (global RNG, so ``torch.manual_seed`` reproduces the
    course's samples), else take the argmax. Stops early once every sequence
    emits ``eos_id`` (the stop token is not appended).

    Full strength: ``gptlab.generate(model, ids, max_new_tokens, temperature=,
    top_k=, top_p=, eos_id=, seed=)`` — KV-cached, with its own seeded generator,
    so its samples differ from this function's for the same ``torch`` seed
    (greedy output is identical).
    """
    if temperature < 0:
        raise GptlabError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise GptlabError(f"top_k={top_k} must be >= 1 (or None to disable)")
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise GptlabError(f"idx must be a (batch, n_tokens) tensor with at least one token; got shape {tuple(idx.shape)}")
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]  # (b, V)
        if top_k is not None:
            top_logits, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
            min_val = top_logits[:, -1:]  # (b, 1): the k-th largest logit
            logits = torch.where(logits < min_val, torch.tensor(float("-inf"), device=logits.device), logits)
        if temperature > 0.0:
            probs = torch.softmax(logits / temperature, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)  # (b, 1)
        else:
            idx_next = torch.argmax(logits, dim=-1, keepdim=True)  # (b, 1)
        if eos_id is not None and bool((idx_next == eos_id).all()):
            break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, save_path=None):
    """Training and validation loss against epochs, with tokens seen on a second x axis.

    Returns the matplotlib figure; ``save_path`` (not in the course's signature)
    also writes it (PDF/PNG by extension, atomically). Full strength: every
    ``gptlab train`` run writes ``RUN/loss.png``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not len(train_losses) == len(val_losses) == len(epochs_seen) == len(tokens_seen):
        raise GptlabError(f"plot_losses needs equally long lists; got epochs {len(epochs_seen)}, tokens "
                          f"{len(tokens_seen)}, train {len(train_losses)}, val {len(val_losses)}")
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # second x axis: tokens seen, aligned with the epochs
    ax2.plot(tokens_seen, train_losses, alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    if save_path is not None:
        from gptlab.fileio import atomic_save

        fmt = str(save_path).rsplit(".", 1)[-1] if "." in str(save_path) else "pdf"
        atomic_save(save_path, lambda p: fig.savefig(p, format=fmt))
    return fig


def assign(left: torch.Tensor, right) -> torch.nn.Parameter:
    """A Parameter holding ``right`` if its shape equals ``left``'s (the course's helper)."""
    right = torch.as_tensor(np.asarray(right))
    if left.shape != right.shape:
        raise GptlabError(f"Shape mismatch. Left: {tuple(left.shape)}, Right: {tuple(right.shape)}")
    return torch.nn.Parameter(right.clone().detach().to(dtype=left.dtype, device=left.device))


def load_weights_into_gpt(gpt, params: dict) -> None:
    """Copy GPT-2 weights in the course's ``params`` layout into a ``GPTModel``, in place.

    ``params`` comes from :func:`gptlab.book.download_and_load_gpt2`. GPT-2 stores
    its linear layers as (in, out) matrices (TensorFlow / Conv1D style), so each is
    transposed; the fused ``c_attn`` is split into query, key and value; the output
    head reuses the token embedding (GPT-2 ties them). The model needs GPT-2's
    shape: ``context_length=1024`` and ``qkv_bias=True``.
    Full strength: ``gptlab.load_model("gpt2")`` (any HF GPT-2 / Llama repo or GGUF).
    """
    n_blocks = len(params.get("blocks", []))
    if n_blocks != len(gpt.trf_blocks):
        raise GptlabError(f"the weights have {n_blocks} blocks but the model has {len(gpt.trf_blocks)}; "
                          "build GPTModel with the n_layers/emb_dim/n_heads of this GPT-2 size (model_configs)")
    if gpt.trf_blocks[0].att.W_query.bias is None:
        raise GptlabError("GPT-2 checkpoints have q/k/v biases: build the model with qkv_bias=True "
                          "(NEW_CONFIG.update({'context_length': 1024, 'qkv_bias': True}))")
    try:
        gpt.pos_emb.weight = assign(gpt.pos_emb.weight, params["wpe"])
        gpt.tok_emb.weight = assign(gpt.tok_emb.weight, params["wte"])
        for b, blk in enumerate(params["blocks"]):
            t = gpt.trf_blocks[b]
            q_w, k_w, v_w = np.split(blk["attn"]["c_attn"]["w"], 3, axis=-1)
            t.att.W_query.weight = assign(t.att.W_query.weight, q_w.T)
            t.att.W_key.weight = assign(t.att.W_key.weight, k_w.T)
            t.att.W_value.weight = assign(t.att.W_value.weight, v_w.T)
            q_b, k_b, v_b = np.split(blk["attn"]["c_attn"]["b"], 3, axis=-1)
            t.att.W_query.bias = assign(t.att.W_query.bias, q_b)
            t.att.W_key.bias = assign(t.att.W_key.bias, k_b)
            t.att.W_value.bias = assign(t.att.W_value.bias, v_b)
            t.att.out_proj.weight = assign(t.att.out_proj.weight, blk["attn"]["c_proj"]["w"].T)
            t.att.out_proj.bias = assign(t.att.out_proj.bias, blk["attn"]["c_proj"]["b"])
            t.ff.layers[0].weight = assign(t.ff.layers[0].weight, blk["mlp"]["c_fc"]["w"].T)
            t.ff.layers[0].bias = assign(t.ff.layers[0].bias, blk["mlp"]["c_fc"]["b"])
            t.ff.layers[2].weight = assign(t.ff.layers[2].weight, blk["mlp"]["c_proj"]["w"].T)
            t.ff.layers[2].bias = assign(t.ff.layers[2].bias, blk["mlp"]["c_proj"]["b"])
            t.norm1.scale = assign(t.norm1.scale, blk["ln_1"]["g"])
            t.norm1.shift = assign(t.norm1.shift, blk["ln_1"]["b"])
            t.norm2.scale = assign(t.norm2.scale, blk["ln_2"]["g"])
            t.norm2.shift = assign(t.norm2.shift, blk["ln_2"]["b"])
        gpt.final_norm.scale = assign(gpt.final_norm.scale, params["g"])
        gpt.final_norm.shift = assign(gpt.final_norm.shift, params["b"])
        gpt.out_head.weight = assign(gpt.out_head.weight, params["wte"])
    except KeyError as e:
        raise GptlabError(f"params lacks {e.args[0]!r}; pass the params returned by download_and_load_gpt2") from None
    except GptlabError as e:
        raise GptlabError(f"{e}: the model's shape does not match the weights; for GPT-2 use its "
                          "model_configs entry with context_length=1024 and qkv_bias=True") from None
