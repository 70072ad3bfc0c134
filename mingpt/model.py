"""
The GPT language model: GPT-2's architecture, minGPT's API.

References:
1) the official GPT-2 TensorFlow implementation released by OpenAI:
   https://github.com/openai/gpt-2/blob/master/src/model.py
2) huggingface/transformers PyTorch implementation, whose parameter names we keep so that
   checkpoints map one to one (only the Conv1D weights are stored transposed there):
   https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py

Shapes in comments: B batch, T time (tokens), C channels (n_embd), nh heads, hs head size (C // nh).
"""

import logging
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from mingpt.config import PRESETS, resolve_config  # noqa: F401 (mingpt.model.PRESETS stays importable)
from mingpt.generate import complete
from mingpt.errors import ConfigError
from mingpt.hardware import Linear
from mingpt.utils import CfgNode as CN

logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------

class KVCache(nn.Module):
    """
    Preallocated keys and values of one attention layer, (B, nh, max_len, hs) each. Writing the
    new step in place avoids the torch.cat per token (and the reallocation it implies) that a
    growing cache would pay, which is what makes batch-1 decoding weight-bandwidth bound.
    """

    def __init__(self, batch_size, max_len, n_head, head_size, dtype=torch.float32, device=None):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_size)
        self.register_buffer('k', torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer('v', torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start, k, v):
        """
        write k, v (B, nh, T, hs) at positions [start, start+T); return everything up to there.
        start may also be a (B,) LongTensor, one position per row for one new token each (T == 1):
        then the first B rows come back whole, and the caller's mask hides what a row has not written
        """
        if torch.is_tensor(start):
            rows = torch.arange(k.size(0), device=k.device)
            self.k[rows, :, start], self.v[rows, :, start] = k[:, :, 0], v[:, :, 0]
            return self.k[:k.size(0)], self.v[:k.size(0)]
        end = start + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def row(self, i):
        """ row i as a cache of batch size 1 sharing this one's memory: one sequence of a batch prefilled alone """
        view = KVCache(1, 0, self.k.size(1), self.k.size(3), self.k.dtype, self.k.device)
        view.k, view.v = self.k[i:i + 1], self.v[i:i + 1]
        return view


class CausalSelfAttention(nn.Module):
    """
    Multi-head masked self-attention with a projection at the end. The attention itself is
    torch's scaled_dot_product_attention (a fused kernel, and no (T, T) mask buffer to carry in
    the state dict: minGPT's persistent `attn.bias` mask is what broke its loading of newer
    transformers checkpoints).
    """

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, but in a batch
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        # output projection
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.attn_pdrop = config.attn_pdrop
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x, kv_cache=None, cache_pos=0, attn_mask=None):
        B, T, C = x.size()
        # (B, T, 3C) -> three (B, nh, T, hs): heads become a batch dimension. One view + permute
        # rather than split + 3 views + 3 transposes: the same strided views in fewer ops, which
        # counts when decoding runs ~25 small ops per layer per token
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)

        if kv_cache is not None:
            # attend over everything cached so far plus this step: k, v become (B, nh, cache_pos+T, hs)
            k, v = kv_cache.update(cache_pos, k, v)
            if torch.is_tensor(cache_pos):  # a position per row: keys up to the furthest row's, as masked
                k, v = k[:, :, :attn_mask.size(-1)], v[:, :, :attn_mask.size(-1)]

        if attn_mask is None and cache_pos > 0 and T > 1:
            # queries sit at positions [cache_pos, cache_pos+T): causal against an offset diagonal,
            # which is_causal (top-left aligned) cannot express
            attn_mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=cache_pos)
        # a single new query (T == 1) may see every cached key, so it needs no mask at all
        is_causal = attn_mask is None and T > 1
        dropout_p = self.attn_pdrop if self.training else 0.0
        if x.device.type == 'cpu' and torch.is_autocast_enabled('cpu'):
            # mixed precision on CPU: autocast's bf16 matmuls are fast (AVX512-BF16, AMX), but torch's
            # CPU attention kernel is slower in bf16 than in fp32, forward and backward, so attention
            # stays in fp32
            with torch.autocast('cpu', enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                                   dropout_p=dropout_p, is_causal=is_causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                               is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side

        # output projection
        y = self.resid_dropout(self.c_proj(y))
        return y


class NewGELU(nn.Module):
    """ GPT-2's GELU: the tanh approximation (Hendrycks & Gimpel), as in BERT and OpenAI's code """

    def forward(self, x):
        return F.gelu(x, approximate='tanh')


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.act = NewGELU()
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """ an unassuming Transformer block: pre-LayerNorm, attention then MLP, each residual """

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, cache_pos=0, attn_mask=None):
        x = x + self.attn(self.ln_1(x), kv_cache, cache_pos, attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x

# -----------------------------------------------------------------------------

class GPT(nn.Module):
    """ GPT Language Model """

    @staticmethod
    def get_default_config():
        C = CN()
        # either model_type or (n_layer, n_head, n_embd) must be given in the config
        C.model_type = 'gpt'
        C.n_layer = None
        C.n_head = None
        C.n_embd = None
        # these options must be filled in externally
        C.vocab_size = None
        C.block_size = None
        # dropout hyperparameters
        C.embd_pdrop = 0.1
        C.resid_pdrop = 0.1
        C.attn_pdrop = 0.1
        # share the token embedding with lm_head, as GPT-2 checkpoints do (minGPT keeps them apart)
        C.tie_weights = False
        return C

    def __init__(self, config):
        super().__init__()
        config = resolve_config(config)
        self.config = config
        self.block_size = config.block_size

        self.transformer = nn.ModuleDict(dict(
            wte = nn.Embedding(config.vocab_size, config.n_embd),
            wpe = nn.Embedding(config.block_size, config.n_embd),
            drop = nn.Dropout(config.embd_pdrop),
            h = nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f = nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)

        # init all weights, and apply a special scaled init to the residual projections, per GPT-2:
        # each of the 2 * n_layer residual branches adds variance, so shrink what they add
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02/math.sqrt(2 * config.n_layer))
        if getattr(config, 'tie_weights', False):
            self.lm_head.weight = self.transformer.wte.weight

        # report number of parameters (note we don't count the decoder parameters in lm_head)
        n_params = sum(p.numel() for p in self.transformer.parameters())
        logger.info("number of parameters: %.2fM", n_params/1e6)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            torch.nn.init.zeros_(module.bias)
            torch.nn.init.ones_(module.weight)

    def configure_optimizers(self, train_config):
        """
        AdamW with weight decay on the weights of Linear layers only: biases, LayerNorm gains and
        embeddings are not decayed (shrinking them towards zero has no regularising meaning).
        Every parameter lands in exactly one group; a weight shared between lm_head and wte counts
        as the embedding it is.
        """
        embedding_ids = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        decay_ids = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)} - embedding_ids
        params = list(dict(self.named_parameters()).values())  # named_parameters dedups shared tensors
        decay = [p for p in params if id(p) in decay_ids]
        no_decay = [p for p in params if id(p) not in decay_ids]
        optim_groups = [
            {"params": decay, "weight_decay": train_config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # the fused kernel does the whole update in one pass over memory; foreach is the fallback
        fused = params[0].device.type in ('cuda', 'cpu')
        return torch.optim.AdamW(optim_groups, lr=train_config.learning_rate, betas=train_config.betas,
                                 fused=fused, foreach=None if fused else True)

    def resize_token_embeddings(self, vocab_size):
        """
        Grow the vocabulary to vocab_size tokens, in place: new rows at the end of the token embedding
        (wte) and of lm_head, the old rows untouched, so every old token's logits stay exactly what
        they were. A tied lm_head stays tied to the new wte. The new rows start at the mean of the old
        ones: the new tokens' logits then start at the average logit, far below the likely tokens',
        so the model does not emit them before it is trained to. Returns the model.
        """
        old = self.config.vocab_size
        if vocab_size == old:
            return self
        if vocab_size < old:
            raise ConfigError(f"resize_token_embeddings only grows the vocabulary (the model has {old} "
                              f"tokens, asked for {vocab_size}); removing tokens would renumber nothing "
                              "but lose their rows")

        def grown(w):  # (old, C) -> (vocab_size, C), new rows at the mean of the old
            return torch.cat([w, w.mean(dim=0, keepdim=True).expand(vocab_size - old, -1)])

        tied = self.lm_head.weight is self.transformer.wte.weight
        wte = self.transformer.wte.weight
        self.transformer.wte = nn.Embedding(vocab_size, wte.size(1), device=wte.device, dtype=wte.dtype)
        with torch.no_grad():
            self.transformer.wte.weight.copy_(grown(wte))
        if tied:
            self.lm_head.weight = self.transformer.wte.weight
        else:
            head = self.lm_head.weight
            self.lm_head = Linear(head.size(1), vocab_size, bias=False, device=head.device, dtype=head.dtype)
            with torch.no_grad():
                self.lm_head.weight.copy_(grown(head))
        self.config.vocab_size = vocab_size
        logger.info("resized the vocabulary from %d to %d tokens%s", old, vocab_size,
                    " (lm_head tied to wte)" if tied else "")
        return self

    @classmethod
    def from_pretrained(cls, model_type_or_path, **kwargs):
        """
        A GPT with pretrained weights: a hub name ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl',
        'distilgpt2'), a Hugging Face directory (mingpt's own checkpoints are these), an OpenAI
        TensorFlow checkpoint directory or an llm.c .bin file. See mingpt.weights.load_pretrained.
        """
        from mingpt.weights import load_pretrained  # here: importing the model loads no checkpoint format
        return load_pretrained(model_type_or_path, model_cls=cls, **kwargs)

    def save_pretrained(self, directory, **kwargs):
        """ write a Hugging Face GPT-2 directory (config.json + model.safetensors); see mingpt.weights.save_hf """
        from mingpt.weights import save_hf  # here, like from_pretrained's import
        return save_hf(self, directory, **kwargs)

    def forward(self, idx, targets=None, *, kv_cache=None, cache_pos=0, pos=None, attn_mask=None,
                last_only=False):
        """
        idx (B, T) token ids -> (logits (B, T, vocab_size), loss or None).
        targets (B, T): next-token ids; -1 marks positions that do not count in the loss.

        The keyword-only arguments serve incremental decoding (mingpt.generate): kv_cache is a
        list of KVCache (one per layer) written at [cache_pos, cache_pos+T); pos (T,) or (B, T)
        overrides the position ids (left-padded batches start each row at 0); attn_mask (B, 1, T,
        cache_pos+T) bool, True where attention is allowed; last_only computes logits for the last
        position only, (B, 1, vocab_size), skipping T-1 needless vocabulary projections.
        cache_pos may be a (B,) LongTensor for one token per row (T == 1), each row of the cache's
        first B written at its own position, which is also its position id; the mask then lets
        each row see its own positions up to there only (mingpt.batching's decode step).
        """
        device = idx.device
        if idx.dim() != 2:
            raise ConfigError(f"idx must be a (B, T) tensor of token ids, got shape {tuple(idx.shape)}; "
                              "for one sequence use idx[None]")
        b, t = idx.size()
        end = cache_pos + t
        if torch.is_tensor(cache_pos):
            # one new token per row, each at its own position (a batch of independent sequences,
            # mingpt.batching): a row sees its own cached keys only, up to the furthest row's end
            assert t == 1 and cache_pos.shape == (b,), "a position per row is for one new token per row"
            end = int(cache_pos.max()) + 1
            pos = cache_pos[:, None] if pos is None else pos  # (B, 1)
            if attn_mask is None:  # (B, 1, 1, end)
                attn_mask = (torch.arange(end, device=device) <= cache_pos[:, None])[:, None, None, :]
        if end > self.block_size:
            raise ConfigError(f"cannot forward a sequence of length {end}: the model's "
                              f"block_size (context length) is only {self.block_size}; crop the "
                              f"input to its last {self.block_size} tokens")
        if kv_cache is None and not torch.compiler.is_compiling():
            # an id outside the vocabulary would otherwise be torch's "index out of range in self";
            # one fused min/max per call (the decoding engine checks its prompts itself, and every
            # token it generates is in range, so its cached steps skip this)
            self._check_ids(idx, 'idx', 0)
            if targets is not None:
                if targets.shape != idx.shape:
                    raise ConfigError(f"targets must have idx's shape {tuple(idx.shape)}, got "
                                      f"{tuple(targets.shape)}: one next-token id per position")
                self._check_ids(targets, 'targets', -1)
        if pos is None:
            pos = torch.arange(cache_pos, cache_pos + t, dtype=torch.long, device=device)  # (T,)

        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C) or (B, T, C)
        x = self.transformer.drop(tok_emb + pos_emb)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if kv_cache is None else kv_cache[i], cache_pos, attn_mask)
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)

        # if we are given some desired targets also calculate the loss
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

        return logits, loss

    def _check_ids(self, ids, name, lowest):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ConfigError(f"{name} must hold integer token ids, not {str(ids.dtype).removeprefix('torch.')}; "
                              "e.g. torch.tensor(ids, dtype=torch.long)")
        if ids.numel() == 0:
            return
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < lowest or hi >= self.config.vocab_size:
            raise ConfigError(f"{name} holds token ids from {lo} to {hi}, but this model's vocabulary "
                              f"has ids 0 to {self.config.vocab_size - 1}"
                              + (" (and -1 for targets that do not count)" if lowest < 0 else "")
                              + "; was the text encoded with another tokenizer, or is vocab_size too small?")

    def make_kv_cache(self, batch_size, max_len=None, dtype=None, device=None):
        """ one preallocated KVCache per layer, for up to max_len (default block_size) positions """
        p = self.transformer.wte.weight  # not lm_head's, which may be int8 (mingpt.quantize)
        C = self.config
        return [KVCache(batch_size, max_len or self.block_size, C.n_head, C.n_embd // C.n_head,
                        dtype=dtype or p.dtype, device=device or p.device)
                for _ in range(C.n_layer)]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, do_sample=False, top_k=None, **kwargs):
        """
        Take a conditioning sequence of indices idx (LongTensor of shape (b,t)) and complete
        the sequence max_new_tokens times, feeding the predictions back into the model each time.
        Greedy by default (do_sample=False); returns (b, t + max_new_tokens).
        Most likely you'll want to make sure to be in model.eval() mode of operation for this.

        Prefills a KV cache once and then decodes one token per step (use_cache=False recomputes
        everything, as minGPT did, for the same tokens). More keyword arguments: top_p, seed,
        generator, eos_token_id, pad_token_id, attention_mask (or pass idx as a list of 1-D
        prompts), use_cache, window_keep; see mingpt.generate.stream, the engine this runs.
        """
        return complete(self, idx, max_new_tokens, temperature=temperature,
                                   do_sample=do_sample, top_k=top_k, **kwargs)
